"""An audit log of what leaves the device: one JSON line per outbound result.

Placed after ``FastLayerGuard`` in the result filter chain, it records what actually left
(return code, every top-level key, data kind, parameter names and shapes, meta and metric
names; for a secure-aggregation message its type and vector length), never the values, in
``<site workspace>/outbound_audit.jsonl``. Operators read it to check the privacy promise; the
tests read it to prove it.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from app_custom.durable import append_jsonl
from app_custom.egress import SECAGG_KEY, secagg_summary

AUDIT_FILE = "outbound_audit.jsonl"


class OutboundAudit(Filter):
    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        record = {
            "site": fl_ctx.get_identity_name(),
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "round": shareable.get_header(AppConstants.CURRENT_ROUND),
            "return_code": shareable.get_return_code(ReturnCode.OK),
            "keys": sorted(shareable),
            "data_kind": None,
            "params": {},
            "meta": [],
            "metrics": [],
        }
        if "DXO" in shareable:
            dxo = from_shareable(shareable)
            meta = dict(dxo.meta or {})
            record["data_kind"] = str(dxo.data_kind)
            if isinstance(dxo.data, dict):
                record["params"] = {str(k): list(getattr(v, "shape", ())) for k, v in dxo.data.items()}
            else:
                record["params"] = {"<not a mapping>": list(getattr(dxo.data, "shape", ()))}
            if isinstance(dxo.data, dict) and SECAGG_KEY in dxo.data:
                record["secagg"] = secagg_summary(dxo.data[SECAGG_KEY])
            record["metrics"] = sorted(meta.pop(FLMetaKey.INITIAL_METRICS, None) or {})
            record["meta"] = sorted(meta)
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        root = Path(workspace.get_root_dir()) if workspace else Path.cwd()
        append_jsonl(root / AUDIT_FILE, record)
        return shareable
