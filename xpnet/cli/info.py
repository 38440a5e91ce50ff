"""``xpnet info``: the backend in use and why, the device, the library versions, and which
implementation each op and layer chain would use (``xpnet.dispatch``)."""

from __future__ import annotations

import json


def add_command(sub) -> None:
    """Register ``xpnet info``."""
    p = sub.add_parser("info", help="show the backend in use, why, the device and library versions")
    p.add_argument("--json", action="store_true", help="print as JSON (default: a readable table)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import backend

    from .. import dispatch

    data = backend.info()
    if args.json:
        data["dispatch"] = dispatch.describe()
        print(json.dumps(data, indent=2, default=str))
        return 0
    print_backend_info(data)
    print("\nimplementations (tried in order; XPNET_REFERENCE=1 forces the reference):")
    for line in dispatch.describe():
        print("  " + line)
    return 0


def print_backend_info(data: dict) -> None:
    """The readable table of ``backend.info()``: backend, dtype, CuPy and device, Python, versions."""
    print(f"backend      {data['backend']}  ({data['reason']})")
    print(f"dtype        {data['dtype']}")
    print(f"CuPy         {'importable' if data['cupy_importable'] else 'not importable'}; "
          f"CUDA device {'usable' if data['cuda_device_usable'] else 'not usable'} ({data['device_probe']})")
    dev = data.get("device") or {}
    if dev:
        gib = 1024 ** 3
        print(f"device       {dev['name']} (#{dev['id']}, compute capability {dev['compute_capability']}), "
              f"{dev['memory_free_bytes'] / gib:.1f} GiB free of {dev['memory_total_bytes'] / gib:.1f} GiB")
        print(f"CUDA         runtime {data.get('cuda_runtime')}, driver {data.get('cuda_driver')}")
    print(f"python       {data['python']} on {data['platform']}, {data['cpu_count']} CPU cores")
    print("versions     " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
