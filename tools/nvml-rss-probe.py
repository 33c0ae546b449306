#!/usr/bin/env python3
"""Which NVML call grows a process's memory (issue 19: agent RSS <= 20 MiB).

Calls, through ctypes and in the agent's order, the NVML functions the agent's
gpu/nvml.rs uses (inventory, topology, telemetry poll, event registration and a
short event wait) and prints after each: VmRSS, RssAnon, and whether libcuda is
mapped. Run on a GPU host: python3 tools/nvml-rss-probe.py [GPU_INDEX] [INIT_FLAGS]
[trim]: INIT_FLAGS given (not -), nvmlInitWithFlags(INIT_FLAGS) instead of nvmlInit_v2
(1: no GPUs, 2: no attach); `trim`: glibc's malloc_trim(0) after the init and at
the end. Also prints the largest anonymous mappings after the init.
"""
import ctypes
import sys


def status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    with open("/proc/self/maps") as f:
        maps = f.read()
    libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps.splitlines()
                   if "nvidia" in line or "cuda" in line})
    return fields, libs


last = None


def largest_anon(n=4):
    """The n anonymous mappings with the most resident KiB, from smaps."""
    regions, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                current = {"range": parts[0], "name": parts[5] if len(parts) > 5 else "[anon]", "rss": 0}
                regions.append(current)
            elif parts[0] == "Rss:" and current is not None:
                current["rss"] = int(parts[1])
    anon = sorted((r for r in regions if not r["name"].startswith("/")), key=lambda r: -r["rss"])[:n]
    print("  largest anonymous: " + ", ".join(f"{r['name']} {r['range']} {r['rss'] / 1024:.1f} MiB" for r in anon), flush=True)


def report(step, rc=None):
    global last
    fields, libs = status()
    delta = "" if last is None else f" (+{fields['VmRSS'] - last['VmRSS']:.1f} rss, +{fields['RssAnon'] - last['RssAnon']:.1f} anon)"
    print(f"{step:<42} rc={rc!s:<4} rss={fields['VmRSS']:.1f} anon={fields['RssAnon']:.1f} "
          f"file={fields['RssFile']:.1f} MiB{delta} libs={','.join(libs)}", flush=True)
    last = fields


def main():
    index = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    report("start")
    nvml = ctypes.CDLL("libnvidia-ml.so.1")
    report("dlopen libnvidia-ml.so.1")
    call = lambda name, *args: getattr(nvml, name)(*args)  # noqa: E731
    flags = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    trim = "trim" in sys.argv[3:]
    if flags is None:
        report("nvmlInit_v2", call("nvmlInit_v2"))
    else:
        report(f"nvmlInitWithFlags({flags})", call("nvmlInitWithFlags", ctypes.c_uint(flags)))
    largest_anon()
    libc = ctypes.CDLL("libc.so.6")
    if trim:
        report("malloc_trim(0)", libc.malloc_trim(0))
    count = ctypes.c_uint(0)
    report("nvmlDeviceGetCount_v2", call("nvmlDeviceGetCount_v2", ctypes.byref(count)))
    buf = ctypes.create_string_buffer(256)
    report("nvmlSystemGetDriverVersion", call("nvmlSystemGetDriverVersion", buf, 256))
    dev = ctypes.c_void_p()
    report("nvmlDeviceGetHandleByIndex_v2", call("nvmlDeviceGetHandleByIndex_v2", index, ctypes.byref(dev)))
    uuid = ctypes.create_string_buffer(96)
    report("nvmlDeviceGetUUID", call("nvmlDeviceGetUUID", dev, uuid, 96))
    report("nvmlDeviceGetName", call("nvmlDeviceGetName", dev, buf, 256))
    big = ctypes.create_string_buffer(4096)
    report("nvmlDeviceGetMemoryInfo", call("nvmlDeviceGetMemoryInfo", dev, big))
    report("nvmlDeviceGetPciInfo_v3", call("nvmlDeviceGetPciInfo_v3", dev, big))
    active = ctypes.c_int(0)
    report("nvmlDeviceGetNvLinkState(0)", call("nvmlDeviceGetNvLinkState", dev, 0, ctypes.byref(active)))
    level = ctypes.c_int(0)
    report("nvmlDeviceGetTopologyCommonAncestor", call("nvmlDeviceGetTopologyCommonAncestor", dev, dev, ctypes.byref(level)))
    dev2 = ctypes.c_void_p()
    report("nvmlDeviceGetHandleByUUID", call("nvmlDeviceGetHandleByUUID", uuid, ctypes.byref(dev2)))
    report("nvmlDeviceGetUtilizationRates", call("nvmlDeviceGetUtilizationRates", dev, big))
    value = ctypes.c_uint(0)
    report("nvmlDeviceGetTemperature", call("nvmlDeviceGetTemperature", dev, 0, ctypes.byref(value)))
    report("nvmlDeviceGetPowerUsage", call("nvmlDeviceGetPowerUsage", dev, ctypes.byref(value)))
    report("nvmlDeviceGetEnforcedPowerLimit", call("nvmlDeviceGetEnforcedPowerLimit", dev, ctypes.byref(value)))
    report("nvmlDeviceGetClockInfo(SM)", call("nvmlDeviceGetClockInfo", dev, 1, ctypes.byref(value)))
    reasons = ctypes.c_ulonglong(0)
    report("nvmlDeviceGetCurrentClocksThrottleReasons",
           call("nvmlDeviceGetCurrentClocksThrottleReasons", dev, ctypes.byref(reasons)))
    ecc = ctypes.c_ulonglong(0)
    report("nvmlDeviceGetTotalEccErrors", call("nvmlDeviceGetTotalEccErrors", dev, 1, 1, ctypes.byref(ecc)))
    pages = ctypes.c_uint(0)
    report("nvmlDeviceGetRetiredPages", call("nvmlDeviceGetRetiredPages", dev, 1, ctypes.byref(pages), None))
    procs = ctypes.c_uint(64)
    report("nvmlDeviceGetComputeRunningProcesses_v3",
           call("nvmlDeviceGetComputeRunningProcesses_v3", dev, ctypes.byref(procs), big))
    fields = ctypes.create_string_buffer(40 * 4)
    for i, field_id in enumerate((142, 143, 144, 145)):
        ctypes.c_uint.from_buffer(fields, 40 * i).value = field_id
    report("nvmlDeviceGetFieldValues(remapped)", call("nvmlDeviceGetFieldValues", dev, 4, fields))
    event_set = ctypes.c_void_p()
    report("nvmlEventSetCreate", call("nvmlEventSetCreate", ctypes.byref(event_set)))
    types = ctypes.c_ulonglong(0)
    report("nvmlDeviceGetSupportedEventTypes", call("nvmlDeviceGetSupportedEventTypes", dev, ctypes.byref(types)))
    report("nvmlDeviceRegisterEvents", call("nvmlDeviceRegisterEvents", dev, ctypes.c_ulonglong(types.value), event_set))
    report("nvmlEventSetWait_v2(100ms)", call("nvmlEventSetWait_v2", event_set, big, 100))
    for _ in range(3):
        call("nvmlDeviceGetUtilizationRates", dev, big)
        call("nvmlDeviceGetComputeRunningProcesses_v3", dev, ctypes.byref(procs), big)
    report("3 more polls")
    report("nvmlEventSetFree", call("nvmlEventSetFree", event_set))
    if trim:
        report("malloc_trim(0)", libc.malloc_trim(0))
    report("nvmlShutdown", call("nvmlShutdown"))


if __name__ == "__main__":
    main()
