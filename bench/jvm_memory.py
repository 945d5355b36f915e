"""Shared by the bench scripts: the JVM's live heap after its most recent GCs, read through JMX (py4j)."""


def live_heap_after_new_gcs(gcs, seen: dict, pools) -> int | None:
    """Max bytes used in the heap ``pools`` after each GC not seen before (``seen``: GC name -> last GC id, updated);
    None when no collector ran since the last call."""
    live = None
    for g in gcs:
        info = g.getLastGcInfo()
        if info is None or seen.get(str(g.getName())) == int(info.getId()):
            continue
        seen[str(g.getName())] = int(info.getId())
        after = info.getMemoryUsageAfterGc()
        v = sum(int(after[n].getUsed()) for n in pools if n in after)
        live = v if live is None else max(live, v)
    return live
