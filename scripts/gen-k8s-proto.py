#!/usr/bin/env python3
"""Generates proto/proto/k8s/*.proto: Kubernetes' protobuf wire schema for the
packages Capstan serves, so the API server can decode the protobuf bodies
kubectl's typed clients send (`application/vnd.kubernetes.protobuf`).

Field numbers and types come from the `k8s-pb` crate (prost code generated from
Kubernetes' .proto files); field names are the JSON names, taken from the
`k8s-openapi` crate, so protoc's json_name equals Kubernetes' JSON field name.
Both crates are dependencies in Cargo.lock; run after changing either:

    python3 scripts/gen-k8s-proto.py
"""
import glob, os, re, sys

REG = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/"))
def crate_dir(name):
    for r in REG:
        hits = sorted(glob.glob(os.path.join(r, name + "-*")))
        if hits:
            return hits[-1]
    sys.exit(f"crate {name} not found in ~/.cargo/registry (run cargo fetch)")

PB = os.path.join(crate_dir("k8s-pb"), "src")
OA = os.path.join(crate_dir("k8s-openapi"), "src", "v1_32")
OUT = os.path.join(os.path.dirname(__file__), "..", "proto", "proto", "k8s")

ROOTS = ["api/core/v1", "api/apps/v1", "api/batch/v1", "api/rbac/v1", "api/authorization/v1",
         "api/authentication/v1", "api/policy/v1", "api/coordination/v1", "api/discovery/v1",
         "api/autoscaling/v1", "api/autoscaling/v2", "api/scheduling/v1"]

SCALARS = {"string": "string", "int32": "int32", "int64": "int64", "bool": "bool", "double": "double",
           "bytes": "bytes", "float": "float"}

def json_names():
    """(module, struct lower) -> {normalized: json name} from k8s-openapi."""
    out = {}
    for path in glob.glob(os.path.join(OA, "**", "*.rs"), recursive=True):
        mod = os.path.relpath(os.path.dirname(path), OA)
        src = open(path).read()
        m = re.search(r"pub struct (\w+)", src)
        if not m:
            continue
        names = {}
        for js, _ in re.findall(r'"([A-Za-z0-9_$]+)" => Field::Key_(\w+)', src):
            names[js.lower().replace("_", "")] = js
        out[(mod, m.group(1).lower())] = names
    return out

def parse_module(mod):
    src = open(os.path.join(PB, mod, "mod.rs")).read()
    src = "\n".join(l for l in src.splitlines() if not l.strip().startswith("//"))
    msgs = {}
    for m in re.finditer(r"pub struct (\w+) \{(.*?)\n\}", src, re.S):
        name, body = m.group(1), m.group(2)
        fields = []
        for f in re.finditer(r"#\[prost\((.*?)\)\]\s*pub\s+(?:r#)?(\w+)\s*:\s*(.*?),\s*(?=#\[prost|$)", body, re.S):
            attr, fname, ty = f.group(1), f.group(2), " ".join(f.group(3).split())
            tag = int(re.search(r'tag = "(\d+)"', attr).group(1))
            fields.append((attr, fname, ty, tag))
        msgs[name] = fields
    return msgs

def resolve(mod, ty_path):
    parts = ty_path.split("::")
    base = mod.split("/")
    while parts and parts[0] == "super":
        base = base[:-1]
        parts = parts[1:]
    return "/".join(base + parts[:-1]), parts[-1]

def message_type(mod, ty):
    paths = [p for p in re.findall(r"[\w:]+", ty) if p.split("::")[-1] not in
             ("core", "option", "Option", "prost", "alloc", "vec", "Vec", "string", "String", "collections", "BTreeMap", "u8")]
    paths = [p for p in paths if not p.startswith("::")]
    return resolve(mod, paths[-1])

def pkg(mod):
    return "k8s.io." + mod.replace("/", ".")

def main():
    names = json_names()
    todo, seen, files = list(ROOTS), set(), {}
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        msgs = parse_module(mod)
        imports, lines = set(), []
        for name, fields in sorted(msgs.items()):
            jn = names.get((mod, name.lower()), {})
            lines.append(f"message {name} {{")
            for attr, fname, ty, tag in fields:
                json = jn.get(fname.replace("_", "").lower())
                if json is None:
                    head, *rest = fname.split("_")
                    json = head + "".join(w.capitalize() for w in rest)
                kind = attr.split(",")[0].split("=")[0].strip()
                label = "repeated" if "repeated" in attr else "optional"
                if kind == "btree_map":
                    k, v = [x.strip() for x in re.search(r'btree_map = "([^"]*)"', attr).group(1).split(",")]
                    if v == "message":
                        vm, vn = message_type(mod, ty)
                        if vm != mod:
                            imports.add(vm); todo.append(vm)
                        v = f".{pkg(vm)}.{vn}"
                    lines.append(f"  map<{k}, {v}> {json} = {tag};")
                elif kind == "message":
                    tm, tn = message_type(mod, ty)
                    if tm != mod:
                        imports.add(tm); todo.append(tm)
                    lines.append(f"  {label} .{pkg(tm)}.{tn} {json} = {tag};")
                else:
                    lines.append(f"  {label} {SCALARS[kind]} {json} = {tag};")
            lines.append("}\n")
        files[mod] = (imports, lines)
    os.makedirs(OUT, exist_ok=True)
    for old in glob.glob(os.path.join(OUT, "**", "*.proto"), recursive=True):
        os.remove(old)
    for mod, (imports, lines) in sorted(files.items()):
        path = os.path.join(OUT, mod + ".proto")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("// Generated by scripts/gen-k8s-proto.py from the k8s-pb and k8s-openapi crates. Do not edit.\n")
            f.write('syntax = "proto2";\n\n')
            f.write(f"package {pkg(mod)};\n\n")
            for i in sorted(imports):
                f.write(f'import "k8s/{i}.proto";\n')
            f.write("\n" + "\n".join(lines))
    print(f"wrote {len(files)} packages to {os.path.normpath(OUT)}")

main()
