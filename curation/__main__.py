from curation.cli import main

raise SystemExit(main())
