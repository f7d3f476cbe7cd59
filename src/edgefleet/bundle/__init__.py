"""The ``.efb`` model bundle: manifest schema and the archive reader/writer."""

from edgefleet.bundle.archive import BundleReader, file_ref, read_manifest, read_npz, unpack_bundle, write_bundle
from edgefleet.bundle.manifest import FileRef, GoldenRef, Manifest, PipelineSpec, TensorInfo, parse_manifest

__all__ = [
    "BundleReader",
    "FileRef",
    "GoldenRef",
    "Manifest",
    "PipelineSpec",
    "TensorInfo",
    "file_ref",
    "parse_manifest",
    "read_manifest",
    "read_npz",
    "unpack_bundle",
    "write_bundle",
]
