"""A project's webhook to this backend (`<backend URL>/webhook`): exactly one, with the backend's credentials.

Label Studio creates one when an ML backend is connected (if it accepts the URL, see below) and leaves it behind
when the ML backend is deleted; a connection repeated under another spelling of the URL adds another, and then
every annotation event arrives twice. `reconcile_webhook` keeps one, deletes the others that point at this
backend (`BackendMatcher`), and creates one when there is none.

Label Studio 1.23 refuses a webhook URL that Django's URLValidator refuses: a host must be a dotted domain
name, `localhost` or an IP address, so `http://sam-backend:9090/webhook` (a docker-compose service name) is
"not a valid URL" although the same ML backend URL is accepted. When it refuses every URL offered,
`WebhookRefused` carries its reason.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

from .backend_match import BackendMatcher, Endpoint, webhook_base
from .label_studio import ConnectError, HTTPFailure, LabelStudioClient

REFUSED_HINT = ("Label Studio accepts a webhook URL only when its host is a dotted domain name, localhost or an IP "
                "address (Django's URL validator); a bare name such as a docker-compose service name is refused. "
                "Connect with --url naming the backend by such a host (in docker-compose: its network alias, "
                "http://sam-backend.internal:9090), or Label Studio never tells the backend about new annotations "
                "and training never starts")


class WebhookRefused(ConnectError):
    """Label Studio refused to create the project's webhook to this backend; `reason` is its answer."""

    def __init__(self, urls: list[str], reason: str) -> None:
        super().__init__(f"Label Studio refused the webhook {' and '.join(urls)}: {reason}")
        self.urls = urls
        self.reason = reason


def webhook_headers(basic_auth: tuple[str, str] | None) -> dict[str, str]:
    """The header Label Studio's ML webhook needs to pass the backend's basic auth."""
    if basic_auth is None:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()}


@dataclass
class WebhookOutcome:
    """What `reconcile_webhook` found and did: notes for the user, the id of the webhook it created (if any)."""

    notes: list[str] = field(default_factory=list)
    created: int | None = None


def reconcile_webhook(ls: LabelStudioClient, project_id: int, urls: list[str], matcher: BackendMatcher,
                      basic_auth: tuple[str, str] | None, ml_urls: list[str]) -> WebhookOutcome:
    """Leave the project exactly one webhook to this backend, sending `basic_auth`'s header.

    urls: backend URLs as Label Studio reaches them, preferred first (the kept ML backend's, then --url): the
    webhook kept is one of them if any, a new one is made at the first Label Studio accepts. ml_urls: the
    project's ML backends, to name webhooks to other backends that no ML backend uses (reported, left alone:
    this backend cannot tell whether they are stale). Raises WebhookRefused when none can be made."""
    outcome = WebhookOutcome()
    wanted = webhook_headers(basic_auth)
    ours, strays = [], []
    for hook in ls.webhooks(project_id):
        base = webhook_base(hook.get("url") or "")
        if base is None:
            continue
        how = matcher.same(base)
        if how:
            ours.append((hook, how))
        elif not any(Endpoint.parse(base) == Endpoint.parse(u) for u in ml_urls):
            strays.append(hook)
    for hook in strays:
        outcome.notes.append(f"webhook {hook['id']} ({hook['url']}) is no ML backend's of this project and not this "
                             "backend's: left alone (delete it in the project's Settings > Webhooks if unused)")
    if not ours:
        outcome.created = _create(ls, project_id, urls, wanted)
        outcome.notes.append(f"webhook {outcome.created} created")
        return outcome
    preferred = [Endpoint.parse(u) for u in urls]
    ours.sort(key=lambda pair: (Endpoint.parse(webhook_base(pair[0]["url"]) or "") not in preferred, pair[0]["id"]))
    keep = ours[0][0]
    for hook, how in ours[1:]:
        ls.delete_webhook(int(hook["id"]))
        outcome.notes.append(f"removed duplicate webhook {hook['id']} ({hook['url']}: {how} as this backend)")
    headers = keep.get("headers") or {}
    if headers.get("Authorization") != wanted.get("Authorization"):
        kept = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        ls.set_webhook_headers(int(keep["id"]), {**kept, **wanted})
        outcome.notes.append(f"webhook {keep['id']} credentials {'set' if wanted else 'removed'}")
    return outcome


def _create(ls: LabelStudioClient, project_id: int, urls: list[str], headers: dict[str, str]) -> int:
    """A new webhook at the first of `urls` (distinct servers only) Label Studio accepts; its id."""
    tried, reasons, seen = [], [], set()
    for url in urls:
        endpoint = Endpoint.parse(url)
        if endpoint in seen:
            continue
        seen.add(endpoint)
        hook_url = url.strip().rstrip("/") + "/webhook"
        try:
            return int(ls.create_webhook(project_id, hook_url, headers)["id"])
        except HTTPFailure as exc:
            if exc.status != 400:
                raise
            tried.append(hook_url)
            reasons.append(str(exc).split(": ", 1)[-1])
    raise WebhookRefused(tried, "; ".join(dict.fromkeys(reasons)))
