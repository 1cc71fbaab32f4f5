"""Source readers by manifest `kind`, and the one loader every stage uses."""

from __future__ import annotations

from curation.ingest.base import Scan, SourceReader
from curation.ingest.dicom import DicomReader
from curation.ingest.image2d import Image2DReader
from curation.ingest.nifti import NiftiGroupReader, NiftiReader
from curation.ingest.qa import QaReader
from curation.keys import Keyer, resolve_secret
from curation.manifest import BuildSpec

READERS: dict[str, type[SourceReader]] = {
    r.kind: r for r in (DicomReader, NiftiReader, NiftiGroupReader, Image2DReader, QaReader)
}


def readers_for(spec: BuildSpec) -> dict[str, SourceReader]:
    """One reader per source of the manifest, keyed by source name."""
    keyer = Keyer(resolve_secret(spec.key))
    return {s.name: READERS[s.kind](s, keyer) for s in spec.sources}


__all__ = ["READERS", "Scan", "SourceReader", "readers_for"]
