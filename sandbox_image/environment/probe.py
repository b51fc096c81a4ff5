"""Run once in a freshly built environment image, as a sandbox runs (the
sandbox user, no network, read-only root, an empty /tmp): which
distributions are installed, which of their top-level modules import, and
whether importing them wrote anything. Prints one JSON line after a marker.
"""

import importlib
import importlib.metadata
import json
import os
import sys

ENV_DIR = "/opt/legion/env"
MARKER = "LEGION-ENVIRONMENT-PROBE "


def top_level(dist):
    names = set()
    for file in dist.files or ():
        parts = file.parts
        if not parts or parts[0].endswith((".dist-info", ".data", ".libs")):
            continue
        if parts[0] in ("bin", "__pycache__"):
            continue
        first = parts[0]
        if len(parts) == 1:
            if not first.endswith((".py", ".so")):
                continue
            first = first.split(".", 1)[0]
        if first.isidentifier() and not first.startswith("_"):
            names.add(first)
    return sorted(names)


def written(root):
    found = []
    for folder, dirs, files in os.walk(root):
        found += [os.path.join(folder, name) for name in dirs + files]
    return sorted(found)


packages = []
for dist in importlib.metadata.distributions(path=[ENV_DIR]):
    name, version = dist.metadata["Name"], dist.version
    imported, failed = [], []
    for module in top_level(dist):
        try:
            importlib.import_module(module)
        except BaseException as exc:
            failed.append(f"{module}: {type(exc).__name__}: {exc}"[:300])
        else:
            imported.append(module)
    packages.append({"name": name, "version": version, "modules": imported, "failed": failed})
packages.sort(key=lambda p: p["name"].lower())
report = {"packages": packages, "written": written("/tmp"), "python": sys.version.split()[0]}
sys.stdout.flush()
print(MARKER + json.dumps(report), flush=True)
