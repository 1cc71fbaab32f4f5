from curation.cli import run

run()
