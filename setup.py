"""Build hooks: generate the gRPC/protobuf modules and compile the Cython twins.

`pip install .` (and `pip install -e .`) run this. Generated code lands in
`broker/v1/` (the proto package `broker.v1`, so protoc's own imports resolve
without rewriting) and is never edited by hand or committed.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent
PROTO_DIR = ROOT / "proto"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build requirement

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for folder in {(ROOT / p).parent for p in protos}:
        (folder / "__init__.py").touch()


def extensions() -> list[Extension]:
    if os.environ.get("BROKER_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize  # build requirement

    return cythonize(
        [Extension("broker_ext._codec_c", ["broker_ext/_codec_c.pyx"])],
        compiler_directives={"language_level": "3", "embedsignature": True},
    )


generate_protos()
setup(ext_modules=extensions())
