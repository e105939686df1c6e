"""``recfleet drift``: a batch's cold fraction and chi-square drift against a reference batch."""

from __future__ import annotations

from typing import Any

import click
import httpx
import orjson

from recfleet.cli.context import api_url_option, pass_settings
from recfleet.shared.drift import ordered_categories, shares
from recfleet.shared.settings import Settings


def _request(method: str, url: str, path: str, **kwargs: Any) -> httpx.Response:
    """One call to the gateway. Raises ClickException when it fails or answers an error."""
    try:
        resp = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"gateway unreachable at {url}: {exc}") from exc
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        raise click.ClickException(f"gateway answered {resp.status_code}: {detail}")
    return resp


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def render(report: dict[str, Any]) -> str:
    """The drift report as a few aligned lines of text."""
    batch, ref, test = report["batch"], report["reference"], report["chi_square"]
    lines = [
        f"batch        {batch['batch_id']} ({batch['state']}, {batch['users_done']:,} users)",
        f"cold users   {batch['cold_users']:,}  fraction {_fraction(batch['cold_fraction'])}",
    ]
    if ref is None:
        lines.append("reference    none (no other finished batch); no chi-square test")
    else:
        lines += [
            f"reference    {ref['batch_id']} ({report['reference_source']}, "
            f"{ref['users_done']:,} users)",
            f"ref. cold    {ref['cold_users']:,}  fraction {_fraction(ref['cold_fraction'])}",
        ]
    observed = batch["recommended_by_popularity"]
    expected = ref["recommended_by_popularity"] if ref else {}
    share_obs, share_ref = shares(observed), shares(expected)
    lines.append(f"{'bucket':12} {'batch':>12} {'share':>7} {'reference':>12} {'share':>7}")
    for label in ordered_categories(observed, expected):
        lines.append(
            f"{label:12} {observed.get(label, 0):>12,} {share_obs.get(label, 0):>7.1%} "
            f"{expected.get(label, 0):>12,} {share_ref.get(label, 0):>7.1%}"
        )
    if test is not None:
        lines.append(
            f"chi-square   {test['statistic']:.2f} (dof {test['dof']}), "
            f"p-value {test['p_value']:.3g}, Cramér's V {test['cramers_v']:.3f}"
        )
    return "\n".join(lines)


@click.command()
@click.argument("batch_id", required=False)
@click.option("--reference", default=None, help="compare with this batch instead")
@click.option(
    "--pin", is_flag=True, help="pin BATCH_ID as the reference of later drift tests, and exit"
)
@click.option("--unpin", is_flag=True, help="drop the pinned reference, and exit")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@api_url_option
@pass_settings
def drift(
    s: Settings,
    batch_id: str | None,
    reference: str | None,
    pin: bool,
    unpin: bool,
    as_json: bool,
    api_url: str | None,
) -> None:
    """Show BATCH_ID's cold-user fraction and a chi-square test of its recommendations'
    popularity buckets against a reference batch: --reference, else the pinned batch,
    else the batch that finished before it."""
    url = api_url or s.api_url
    if pin and unpin:
        raise click.UsageError("give --pin or --unpin, not both")
    if unpin:
        _request("DELETE", url, "/api/drift/reference")
        click.echo("no drift reference pinned: each batch is compared with the previous one")
        return
    if batch_id is None:
        raise click.UsageError("missing BATCH_ID")
    if pin:
        _request("PUT", url, "/api/drift/reference", json={"batch_id": batch_id})
        click.echo(f"pinned {batch_id} as the drift reference")
        return
    params = {"reference": reference} if reference else {}
    report = _request("GET", url, f"/api/batches/{batch_id}/drift", params=params).json()
    click.echo(orjson.dumps(report).decode() if as_json else render(report))
