"""Verifier mode: long-poll for audits, recompute the commitment in one prefill, report
the recomputed numbers (never just "ok"); the coordinator judges."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

import httpx

from idlegrid.agent.context import AgentContext, Role
from idlegrid.agent.node_client import CoordinatorError
from idlegrid.core.grammar import GrammarSpec
from idlegrid.core.trust import commitment as cm
from idlegrid.core.trust.report_codec import encode_report
from idlegrid.engines.base import Engine, render_chat
from idlegrid.engines.embedder import is_embedder
from idlegrid.errors import AuthError, EngineError, IdlegridError
from idlegrid.protocol.messages import AuditTaskMsg

log = logging.getLogger("idlegrid.agent.verifier")


def check(engine: Any, msg: AuditTaskMsg, c: cm.Commitment | None = None) -> bytes:
    """Recompute one audited answer (or `c`, a truncation of it); the encoded report."""
    if msg.kind == "embedding":
        from idlegrid.agent.embedding import recompute

        return recompute(engine, msg)
    c = c or cm.decode(base64.b64decode(msg.commitment))
    text = render_chat(engine, msg.messages or []) if msg.kind == "chat" else msg.prompt or ""
    context = [*engine.tokenize(text), *msg.prior_ids]
    if msg.grammar is None:
        report = engine.audit(context, c, msg.max_new_tokens, msg.stop)
    else:
        # The request's grammar, not the commitment's claim: the coordinator already held the
        # committed digest to the request's, and the masks come from what was asked.
        if not hasattr(engine, "matcher"):
            raise EngineError("this engine cannot replay a grammar", engine=engine.name)
        spec = GrammarSpec.from_wire(msg.grammar)
        matcher = engine.matcher(spec, msg.prior_ids)
        report = engine.audit(context, c, msg.max_new_tokens, msg.stop, matcher)
    return encode_report(report)


class Verifier(Role):
    """Takes inference audits on engine 0 (in verifier mode) and keeps its recent reports."""

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx
        self.audited = 0
        # Our recent reports by audit id, to answer for their numbers in a dispute.
        self.reports: OrderedDict[str, bytes] = OrderedDict()

    def loops(self) -> list[Coroutine[Any, Any, None]]:
        """The audit loop, in verifier mode."""
        return [self.audit_loop(self.ctx.engines[0])] if self.ctx.config.verifier else []

    async def audit_loop(self, engine: Engine) -> None:
        """Take audits until the agent drains."""
        if not hasattr(engine, "audit") and not is_embedder(engine):
            log.warning("engine %s cannot audit; verifier mode is off", engine.name)
            return
        ctx = self.ctx
        lock = ctx.engine_lock(engine)
        loop = asyncio.get_running_loop()
        while not ctx.draining.is_set():
            try:
                answer = await ctx.client.call(
                    "/api/v1/audits/poll", {"models": [ctx.model_id]}, timeout=30
                )
            except (httpx.TransportError, CoordinatorError) as exc:
                log.warning("audit poll failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except AuthError:
                await asyncio.sleep(0.5)
                continue
            if answer is None:
                await asyncio.sleep(0.2)
                continue
            msg = AuditTaskMsg.model_validate(answer)

            def run(m: AuditTaskMsg = msg) -> bytes:
                with lock:
                    return check(engine, m)

            try:
                blob = await loop.run_in_executor(None, run)
                # Kept to answer for these numbers if the provider disputes the verdict.
                ctx.remember(self.reports, msg.audit_id, blob)
                await ctx.client.call(
                    f"/api/v1/audits/{msg.audit_id}/report",
                    {"report": base64.b64encode(blob).decode()},
                )
                self.audited += 1
            except (httpx.HTTPError, IdlegridError) as exc:
                log.warning("audit %s: %s", msg.audit_id, exc)
            except Exception:
                log.exception("audit %s failed unexpectedly", msg.audit_id)
