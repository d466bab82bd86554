"""Build hook: ship ``sdzoo-autoload.pth``, the start-up hook that lets timm find the zoo without
``import sdzoo`` (see ``_sdzoo_autoload.py``). Everything else is declared in pyproject.toml.

A .pth file must sit at the top of site-packages, where package data cannot go. A regular wheel is built
from ``build_lib``, so ``build_py`` writes the file there. An editable wheel does not take files from
``build_lib``, so the file is added to the finished editable wheel, with its line in RECORD.
"""
import base64
import hashlib
import os
import zipfile

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "sdzoo-autoload.pth"
# One line, run by site.py at start-up; the module does the rest (and honours SDZOO_DISABLE_AUTOLOAD).
PTH_TEXT = "import _sdzoo_autoload; _sdzoo_autoload.install()\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as f:
                f.write(PTH_TEXT)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    def run(self):
        super().run()
        # setuptools names editable wheels NAME-VERSION-0.editable-TAG.whl; take the one just built.
        wheels = [os.path.join(self.dist_dir, n) for n in os.listdir(self.dist_dir) if "-0.editable-" in n]
        if not wheels:
            raise RuntimeError(f"no editable wheel found in {self.dist_dir}")
        add_to_wheel(max(wheels, key=os.path.getmtime), PTH_NAME, PTH_TEXT.encode())


def add_to_wheel(wheel_path, name, data):
    """Rewrite a wheel with one more top-level file and its RECORD line (sha256, size)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    tmp_path = wheel_path + ".tmp"
    with zipfile.ZipFile(wheel_path) as src, zipfile.ZipFile(tmp_path, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(i.filename for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        dst.writestr(name, data)
        for info in src.infolist():
            content = src.read(info.filename)
            if info.filename == record:
                content = content.rstrip(b"\n") + b"\n" + f"{name},sha256={digest},{len(data)}\n".encode()
            dst.writestr(info, content)
    os.replace(tmp_path, wheel_path)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
