"""Reads Beacon's Iceberg tables with PyIceberg (a different engine) and prints, as JSON,
row counts, distinct event ids and revenue sums per table, plus per-merchant event counts.

    python pyiceberg_read.py <catalog uri> <warehouse uri> [key=value ...]

Both exactly as `beacon up` prints them (and writes them to endpoints.json): the catalog
URI is SQLAlchemy's `sqlite:////abs/path/catalog.db` (four slashes: an absolute path), or
`postgresql+psycopg://...` for a shared catalog.
"""

import json
import sys

import pyarrow.compute as pc
from pyiceberg.catalog.sql import SqlCatalog


def main() -> None:
    uri = sys.argv[1]
    warehouse = sys.argv[2]
    # FileIO settings for a shared warehouse (s3.endpoint, credentials), PyIceberg's names.
    props = dict(arg.split("=", 1) for arg in sys.argv[3:])
    catalog = SqlCatalog("beacon", uri=uri, warehouse=warehouse, **props)
    out = {"tables": sorted(".".join(t) for t in catalog.list_tables("analytics"))}
    for name in ("raw_events", "events", "failed_events"):
        table = catalog.load_table(("analytics", name))
        data = table.scan().to_arrow()
        entry = {"rows": data.num_rows, "snapshots": len(table.snapshots())}
        if "event_id" in data.column_names:
            entry["distinct_event_ids"] = pc.count_distinct(data["event_id"]).as_py()
        if "revenue_micros" in data.column_names:
            entry["revenue_micros"] = pc.sum(data["revenue_micros"]).as_py() or 0
        if name == "events":
            by = data.group_by("merchant_id").aggregate([("event_id", "count")])
            entry["by_merchant"] = {
                m: n for m, n in zip(by["merchant_id"].to_pylist(), by["event_id_count"].to_pylist())
            }
            # A pushed-down filter, as another engine would plan it (when there are rows).
            if entry["by_merchant"]:
                one = sorted(entry["by_merchant"])[0]
                entry["filtered_rows"] = table.scan(row_filter=f"merchant_id == '{one}'").to_arrow().num_rows
                entry["filtered_merchant"] = one
        out[name] = entry
    print(json.dumps(out))


if __name__ == "__main__":
    main()
