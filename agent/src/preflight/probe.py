# Cohort preflight probe: run by the agent as `<python> -c <this>` with a
# timeout. Prints ONE JSON object: for each package, its version and whether
# it imports, with the error text when it does not. Never raises.
import json
import os
import sys


def probe(name, import_name=None, version_of=None):
    entry = {"name": name, "value": "", "ok": False, "detail": ""}
    try:
        module = __import__(import_name or name, fromlist=["_"])
        entry["ok"] = True
        version = getattr(version_of(module) if version_of else module, "__version__", "")
        entry["value"] = str(version) if version else "importable"
        return module, entry
    except BaseException as e:  # noqa: BLE001 - any failure is the finding
        entry["detail"] = f"{type(e).__name__}: {e}"
        return None, entry


def main():
    megatron_lm = os.environ.get("MEGATRON_LM_PATH")
    if megatron_lm and os.path.isdir(megatron_lm):
        # ms-swift 3.x puts this checkout on sys.path before importing megatron.
        sys.path.insert(0, megatron_lm)
    checks = [{"name": "python", "value": sys.version.split()[0], "ok": True, "detail": sys.executable}]
    torch, entry = probe("torch")
    checks.append(entry)
    if torch is not None:
        cuda = getattr(torch.version, "cuda", None)
        checks.append({"name": "torch.cuda", "value": str(cuda or "cpu-only build"), "ok": True, "detail": ""})
        nccl = ""
        try:
            if torch.distributed.is_available() and torch.distributed.is_nccl_available():
                nccl = ".".join(str(p) for p in torch.cuda.nccl.version())
        except BaseException as e:  # noqa: BLE001
            nccl = ""
            checks.append({"name": "nccl", "value": "", "ok": False, "detail": f"{type(e).__name__}: {e}"})
        else:
            checks.append({"name": "nccl", "value": nccl, "ok": bool(nccl), "detail": "" if nccl else "NCCL not available in this torch"})
    te, entry = probe("transformer_engine")
    checks.append(entry)
    if te is not None:
        # The classic breakage: transformer_engine installed without its pytorch
        # module, which fails later as "module 'transformer_engine' has no attribute 'pytorch'".
        _, entry = probe("transformer_engine.pytorch", "transformer_engine.pytorch")
        if entry["ok"]:
            entry["value"] = "importable"
        checks.append(entry)
    else:
        checks.append({"name": "transformer_engine.pytorch", "value": "", "ok": False, "detail": "transformer_engine is not importable"})
    for name, import_name in (("flash_attn", None), ("apex", None), ("megatron.core", "megatron.core"), ("swift", None)):
        _, entry = probe(name, import_name)
        checks.append(entry)
    print(json.dumps({"checks": checks}))


main()
