"""Prefect flow `apply-model`: a trained model applied to a place (STAC search → tiles → COG + STAC item).

A thin wrapper over `dsat_core.apply.job.run_apply`, the same driver `dsat apply` calls; deployments
`apply-model/sr`, `apply-model/cloud-fill` and `apply-model/generate` in infra/prefect.yaml.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from dsat_core.apply.job import ApplyReport, ApplySpec, run_apply


def report_markdown(spec: ApplySpec, report: ApplyReport) -> str:
    """The run's report as a Prefect markdown artifact."""
    lines = [f"# apply-model {spec.kind}", "", f"model `{spec.model}`, AOI {spec.bbox}, {spec.datetime}", ""]
    lines += [f"- wrote `{path}`" for path in report.outputs]
    lines += [f"- skipped `{s['item_id']}`: {s['reason']}" for s in report.skipped]
    lines += ["", f"tiles run {report.tiles_run}, reused {report.tiles_reused}, complete {report.complete}"]
    if report.mlflow_run_id:
        lines.append(f"MLflow run `{report.mlflow_run_id}`")
    return "\n".join(lines)


@flow(name="apply-model", log_prints=True)
def apply_model(params: ApplySpec) -> dict[str, Any]:
    """Apply ``params.model`` to ``params.bbox``; returns the run's report (outputs, skipped items)."""
    logger = get_run_logger()
    report = run_apply(params, log=logger.info)
    create_markdown_artifact(
        key=f"apply-model-{params.kind}", markdown=report_markdown(params, report), description="apply-model"
    )
    return json.loads(json.dumps(report.to_dict(), default=str))


if __name__ == "__main__":
    import sys

    print(json.dumps(apply_model(ApplySpec.model_validate_json(sys.argv[1])), indent=2))
