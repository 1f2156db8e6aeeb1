"""Prints, as one JSON line, what the GPU check runs on: package versions, CUDA, cuDNN, the device,
and whether ffcv imports (a carried build has no package metadata, so versions fall back to
`__version__`)."""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import json


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        try:
            return getattr(importlib.import_module(name), "__version__", "present")
        except Exception:  # not importable at all: reported as missing
            return None


def main() -> None:
    import torch

    info: dict[str, object] = {name: version(name) for name in ("torch", "timm", "deepspeed", "ffcv", "numpy")}
    cuda = torch.cuda.is_available()
    info.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if cuda else None,
                cudnn=torch.backends.cudnn.version() if cuda else None)
    try:
        import ffcv  # noqa: F401

        info["ffcv_import"] = "ok"
    except Exception as err:  # the loader benchmark falls back to ImageFolder and says why
        info["ffcv_import"] = repr(err)[:200]
    print(json.dumps(info))


if __name__ == "__main__":
    main()
