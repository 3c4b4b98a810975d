"""Builds chaostoolkit-faultd with gRPC code generated from faultd's proto.

The proto is read from the repository this package lives in (``../../proto``), or from the
directory named by ``FAULTD_PROTO_DIR``. The generated modules land in the built package as
``chaosfaultd/_generated/faultd/v1/faultd_pb2{,_grpc}.py``; they are never committed.
"""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTO_FILE = "faultd/v1/faultd.proto"


def proto_dir() -> pathlib.Path:
    given = os.environ.get("FAULTD_PROTO_DIR")
    root = pathlib.Path(given) if given else HERE.parent.parent / "proto"
    if not (root / PROTO_FILE).is_file():
        raise SystemExit(
            f"chaostoolkit-faultd: {root / PROTO_FILE} not found; build from faultd's repository "
            "(pip install ./integrations/chaostoolkit) or set FAULTD_PROTO_DIR to its proto/ directory"
        )
    return root


class BuildWithProto(build_py):
    def run(self):
        super().run()
        self.generate(pathlib.Path(self.build_lib) / "chaosfaultd" / "_generated")

    def generate(self, out: pathlib.Path) -> None:
        import grpc_tools
        from grpc_tools import protoc

        out.mkdir(parents=True, exist_ok=True)
        well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir()}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"chaostoolkit-faultd: protoc failed: {' '.join(args)}")
        # protoc writes absolute imports from the proto's path ("from faultd.v1 import ...");
        # inside this package they must name it.
        grpc_module = out / "faultd" / "v1" / "faultd_pb2_grpc.py"
        text = grpc_module.read_text()
        fixed = text.replace("from faultd.v1 import", "from chaosfaultd._generated.faultd.v1 import")
        if fixed == text:
            raise SystemExit(f"chaostoolkit-faultd: unexpected import form in {grpc_module}")
        grpc_module.write_text(fixed)
        for package in (out, out / "faultd", out / "faultd" / "v1"):
            (package / "__init__.py").touch()


setup(cmdclass={"build_py": BuildWithProto})
