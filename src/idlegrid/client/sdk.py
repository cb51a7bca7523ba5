"""A small synchronous client for the grid's own API (the OpenAI routes work with `openai`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from idlegrid.errors import IdlegridError
from idlegrid.tls import httpx_verify


class GridAPIError(IdlegridError):
    """The grid answered with an error; `status` and `body` carry what it said."""

    code = "grid_api_error"


class GridClient:
    """Talks to a coordinator over HTTP; pass `transport` to talk to an app in-process."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 300.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            transport=transport,
            timeout=timeout,
            trust_env=False,
            verify=httpx_verify(),  # IDLEGRID_CA_BUNDLE for a grid behind a private CA
        )

    def __enter__(self) -> GridClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _json(self, resp: httpx.Response) -> dict[str, Any]:
        if resp.status_code >= 400:
            try:
                err = resp.json().get("error", {})
            except ValueError:
                err = {"message": resp.text}
            raise GridAPIError(
                f"HTTP {resp.status_code}: {err.get('message')}", status=resp.status_code, body=err
            )
        data: dict[str, Any] = resp.json()
        return data

    def status(self) -> dict[str, Any]:
        """Nodes, task counts and fees; every balance too with the operator key."""
        return self._json(self.http.get("/api/v1/status"))

    def balance(self) -> dict[str, Any]:
        """The API key's balance."""
        return self._json(self.http.get("/api/v1/balance"))

    def submit_order(self, order: dict[str, Any]) -> dict[str, Any]:
        """Submit a market order (matched at once, or open with reasons)."""
        return self._json(self.http.post("/api/v1/orders", json=order))

    def orders(self, state: str | None = None) -> list[dict[str, Any]]:
        """This key's orders, newest first."""
        params = {"state": state} if state else {}
        return list(self._json(self.http.get("/api/v1/orders", params=params))["orders"])

    def order(self, order_id: str) -> dict[str, Any]:
        """One order."""
        return self._json(self.http.get(f"/api/v1/orders/{order_id}"))

    def explain(self, order_id: str) -> dict[str, Any]:
        """Why an order matched where it did, or why it did not."""
        return self._json(self.http.get(f"/api/v1/orders/{order_id}/explain"))

    def cancel_order(self, order_id: str) -> dict[str, Any]:
        """Cancel an order; the unused escrow comes back."""
        return self._json(self.http.post(f"/api/v1/orders/{order_id}/cancel"))

    def batches(self, limit: int = 20) -> list[dict[str, Any]]:
        """This key's batches (OpenAI Batch objects), newest first."""
        return list(self._json(self.http.get("/v1/batches", params={"limit": limit}))["data"])

    def batch(self, batch_id: str) -> dict[str, Any]:
        """One batch: state, counts, files, and why its lines wait (if they do)."""
        return self._json(self.http.get(f"/v1/batches/{batch_id}"))

    def lease(self, lease_id: str) -> dict[str, Any]:
        """One lease: state, moves with causes, running and billed seconds."""
        return self._json(self.http.get(f"/api/v1/leases/{lease_id}"))

    def create_lease(
        self,
        hours: float,
        resources: dict[str, Any],
        *,
        restart_on_loss: bool = False,
        lease_id: str | None = None,
    ) -> dict[str, Any]:
        """Order a lease (a market order of kind `lease`; its id is the lease's id);
        `restart_on_loss`: if its provider is lost, its unused hours are ordered again."""
        order: dict[str, Any] = {"kind": "lease", "hours": hours, "resources": resources}
        if lease_id is not None:
            order["id"] = lease_id
        if restart_on_loss:
            order["restart_on_loss"] = True
        return self.submit_order(order)

    def current_lease(self, lease_id: str) -> dict[str, Any]:
        """The lease that now stands for `lease_id`: itself, or the last of the leases
        that restarted it after lost providers (`restarted_as` links)."""
        lease = self.lease(lease_id)
        seen = {lease["id"]}
        while lease.get("restarted_as") and lease["restarted_as"] not in seen:
            lease = self.lease(lease["restarted_as"])
            seen.add(lease["id"])
        return lease

    def end_lease(self, lease_id: str) -> dict[str, Any]:
        """End a lease: billed to now, the rest refunded, the workspace wiped."""
        return self._json(self.http.post(f"/api/v1/leases/{lease_id}/end"))

    def extend_lease(self, lease_id: str, hours: float) -> dict[str, Any]:
        """End a lease `hours` later; the extra worst case is escrowed first (402 if short)."""
        return self._json(
            self.http.post(f"/api/v1/leases/{lease_id}/extend", json={"hours": hours})
        )

    def lease_logs(self, lease_id: str) -> str:
        """The last output of a lease's commands."""
        return str(self._json(self.http.get(f"/api/v1/leases/{lease_id}/logs"))["logs"])

    def lease_exec(self, lease_id: str, argv: list[str], **options: Any) -> dict[str, Any]:
        """Run a command in a lease to its end (REST): exit_code, stdout, stderr."""
        body = {"argv": argv, **options}
        return self._json(self.http.post(f"/api/v1/leases/{lease_id}/exec", json=body))

    def submit_job(
        self,
        spec: dict[str, Any],
        ref: str | None = None,
        resources: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Submit a verified training job (its price is escrowed at once); `resources`
        constrain where the market places it (`max_price` per device-hour, `vram_gb`, ...)."""
        body = {
            "spec": spec,
            **({"ref": ref} if ref else {}),
            **({"resources": resources} if resources else {}),
        }
        return self._json(self.http.post("/api/v1/jobs", json=body))

    def jobs(self) -> list[dict[str, Any]]:
        """This key's training jobs, newest first."""
        return list(self._json(self.http.get("/api/v1/jobs"))["jobs"])

    def job(self, job_id: str) -> dict[str, Any]:
        """One training job with its history, losses, audits and bill."""
        return self._json(self.http.get(f"/api/v1/jobs/{job_id}"))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a training job; verified steps stay paid, the rest is refunded."""
        return self._json(self.http.post(f"/api/v1/jobs/{job_id}/cancel"))

    def offers(self, **filters: Any) -> dict[str, Any]:
        """The live book (filters: accelerator, region, model, limit)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return self._json(self.http.get("/api/v1/offers", params=params))

    def earnings(self, period: str = "24h", node: str | None = None) -> dict[str, Any]:
        """Per provider over `period`: credits earned, accrued and paid, energy, tokens/J."""
        params = {"period": period, **({"node": node} if node else {})}
        return self._json(self.http.get("/api/v1/economics/earnings", params=params))

    def market_prices(self) -> dict[str, Any]:
        """Live offers' prices per model and the protocol fee."""
        return self._json(self.http.get("/api/v1/economics/prices"))

    def create_key(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a consumer key (operator): {key_id, api_key}."""
        return self._json(self.http.post("/api/v1/admin/keys", json=body))

    def keys(self) -> list[dict[str, Any]]:
        """Every consumer key with its balance, spend and limits (operator)."""
        keys: list[dict[str, Any]] = self._json(self.http.get("/api/v1/admin/keys"))["keys"]
        return keys

    def set_key_limits(self, key_id: str, limits: dict[str, int | None]) -> dict[str, Any]:
        """Replace the named limits of a key (operator); None lifts one."""
        return self._json(self.http.post(f"/api/v1/admin/keys/{key_id}/limits", json=limits))

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a consumer key (operator)."""
        return self._json(self.http.post(f"/api/v1/admin/keys/{key_id}/revoke"))

    def mint(self, *, key_id: str, amount: int, reference: str) -> dict[str, Any]:
        """Credit a key with `amount` µcr once per `reference` (operator)."""
        body = {"key_id": key_id, "amount": amount, "reference": reference}
        return self._json(self.http.post("/api/v1/admin/mint", json=body))

    def verify_ledger(self) -> dict[str, Any]:
        """Recompute the ledger chain (operator key)."""
        return self._json(self.http.get("/api/v1/ledger/verify"))

    def complete(self, prompt: str, **params: Any) -> dict[str, Any]:
        """One non-streaming completion."""
        body = {"prompt": prompt, **{k: v for k, v in params.items() if v is not None}}
        return self._json(self.http.post("/v1/completions", json=body))

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[str]:
        """Text pieces of a streaming completion as they arrive."""
        body = {
            "prompt": prompt,
            "stream": True,
            **{k: v for k, v in params.items() if v is not None},
        }
        with self.http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                self._json(resp)
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise GridAPIError(event["error"]["message"], body=event["error"])
                yield event["choices"][0]["text"]
