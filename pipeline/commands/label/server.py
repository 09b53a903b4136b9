"""`rlhf label`: rank sampled answers in a local web page, and chat with the checkpoint.

    rlhf label --policy sft:latest --prompts prompts.jsonl --out reward_data/mine.jsonl \\
        [--reward reward:latest] [--k 4] [--temperature 1.0] [--port 8080] [--host 127.0.0.1]
    rlhf run reward data.train_files=[reward_data/mine.jsonl]

The recipe's reward data comes from people: a prompt and several answers sampled from the policy,
ranked best to worst by a labeler. The "Rank" tab shows one prompt of the prompts file (JSONL of
{"prompt": text or chat messages}) and up to K different answers sampled for it; the labeler puts
them in order (drag them, or press 1..K: each key places that answer next), may tie an answer with
the one above it, and submits (Enter), skips (S) or flags (F, with an optional note) the prompt.
A prompts row that carries its answers ("responses", as `rlhf data collect --labeler people`
writes them) shows those answers instead of sampled ones.
A ranking is appended to --out at once, in the ranked format of reward_data/README.md, and fsync'd
before the page moves on; `pipeline.commands.label.store` describes the files and how a reopened session
resumes after the prompts already done. The answers of a prompt are kept while the server runs, so
reloading the page shows the same ones. With --reward, the reward model's scores of the answers
appear once the ranking is submitted, with how often it orders two answers as the labeler did.

The "Chat" tab is a streamed multi-turn conversation with the policy. Under the latest answer:
"regenerate" samples another answer to the same history (arrows flip between them), thumbs-down
marks the shown answer bad and regenerates, thumbs-up keeps the shown answer. An answer is also
kept when the conversation goes on from it (the next message, or "new chat"). Keeping an answer
that was not thumbed down writes one pairwise row {"prompt": the messages before it, "chosen": the
kept answer, "rejected": another} per other answer of that turn to --feedback-out (default
OUT's name with .chat.jsonl), a file `rlhf run reward` also reads (name it in data.train_files next
to OUT, not as a directory of both: one directory holds one format).

Nothing leaves the machine: the page loads no outside resource (its Content-Security-Policy
forbids it), the server listens on 127.0.0.1 unless --host says otherwise, answers only requests
addressed to localhost, and writes need a JSON body, which another site's page cannot send without
asking first.

Served to a team (any other --host, e.g. 0.0.0.0): the server makes a secret token, prints it once
in the link it serves (as notebook servers do), and answers nothing without it (`TokenGate`:
constant-time comparison; never logged). The page asks each labeler's name and every row they
write carries it; a prompt goes to `--rankings-per-prompt` labelers, and /api/stats (shown on the
page) reports how often labelers order two answers alike on the prompts several of them ranked. All text reaches the page as JSON and is shown with `textContent`, so a
prompt or answer containing HTML shows as text. Each ranking's server-side time (check, append,
fsync) is logged and reported at /api/stats.
"""

from __future__ import annotations

import hmac
import math
import re
import secrets
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.commands.label.store import (LabelStore, checked_out_path, distinct_answers,
                                           labeler_agreement)
from pipeline.data.formats import Record
from pipeline.data.prompts import checked_prompt, collected_answers
from pipeline.errors import UserError
from pipeline.generation import (SamplingConfig, generate_kwargs, load_for_sampling, prompt_budget,
                                 sample)
from pipeline.guard import require_causal_lm, require_reward_model
from pipeline.ranking import rank_positions, ranking_metrics
from pipeline.registry import open_registry, resolve_model
from pipeline.reward_model import reward_scorer
from pipeline.tokenizer import encode_prompt

STATIC = Path(__file__).with_name("static")
LOCAL_NAMES = ("127.0.0.1", "localhost")
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Models:
    """The policy (answers, chat) and the optional reward model, behind one lock: one generation
    at a time, since they share one device."""

    def __init__(self, model, tokenizer, sampling: SamplingConfig, seed: int,
                 scorer: Callable[[object, str], float] | None = None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.seed, self.scorer = seed, scorer
        self.max_prompt_tokens = prompt_budget(model, sampling.max_new_tokens)
        self.lock = threading.Lock()
        self.answers_of: dict[int, list[str]] = {}  # prompt index → its answers while we run

    def answers(self, index: int, prompt, k: int) -> list[str]:
        """K different answers to prompt `index`, the same ones each time it is asked for; seeded
        by the index so that a restarted server samples them alike."""
        def draw(n: int, attempt: int) -> list[str]:
            return sample(self.model, self.tokenizer, [prompt] * n, self.sampling,
                          seed=self.seed + 7919 * index + attempt,
                          max_prompt_tokens=self.max_prompt_tokens)

        with self.lock:
            if index not in self.answers_of:
                self.answers_of[index] = distinct_answers(draw, k)
            return self.answers_of[index]

    def scores(self, prompt, answers: list[str]) -> list[float]:
        with self.lock:
            return [self.scorer(prompt, answer) for answer in answers]

    def reply(self, messages: list[dict]) -> Iterator[str]:
        """The policy's answer to a conversation, piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        # Encoded here, before anything is streamed, so that a bad message is a plain 400.
        prompt_ids = encode_prompt(self.tokenizer, messages, self.max_prompt_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        threading.Thread(target=self._generate, args=(prompt_ids, streamer), daemon=True).start()
        return without_leading_space(streamer)

    @torch.no_grad()
    def _generate(self, prompt_ids: list[int], streamer) -> None:
        try:
            with self.lock:
                input_ids = torch.tensor([prompt_ids], device=self.model.device)
                self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    streamer=streamer,
                                    **generate_kwargs(self.tokenizer, self.sampling))
        except Exception as err:  # the page must not wait for an answer that never comes
            print(f"label: chat generation failed: {err}", file=sys.stderr)
            streamer.end()


def without_leading_space(pieces: Iterator[str]) -> Iterator[str]:
    # The answer's first token carries a space; the answer kept in a history is stripped too.
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


class Agreement:
    """How often the reward model orders two answers as the labeler did, over the rankings of OUT:
    pairs the labeler tied are left out, equal scores count half (`ranking_metrics`)."""

    def __init__(self):
        self.score_lists: list[list[float]] = []
        self.rank_lists: list[list[int]] = []

    def add(self, scores: list[float], ranking: list) -> dict:
        self.score_lists.append(scores)
        self.rank_lists.append(rank_positions(ranking))
        this = ranking_metrics(self.score_lists[-1:], self.rank_lists[-1:])
        return {"this": summary_of(this), "overall": self.overall()}

    def overall(self) -> dict | None:
        if not self.score_lists:
            return None
        return summary_of(ranking_metrics(self.score_lists, self.rank_lists))


def summary_of(metrics: dict) -> dict:
    accuracy = metrics["pairwise_accuracy"]
    return {"accuracy": None if math.isnan(accuracy) else accuracy, "pairs": metrics["n_pairs"],
            "prompts": metrics["n_prompts"]}


LABELER_NAME = re.compile(r"[\w .'-]{1,40}")


class Labeling:
    """What the endpoints do, in plain functions of the request body (run in worker threads).

    For a team (`team=True`) every request names its labeler, who gets the prompts they have still
    to decide and whose name goes into every row they write."""

    def __init__(self, store: LabelStore, models: Models, k: int, info: dict, team: bool = False):
        self.store, self.models, self.k, self.info = store, models, k, info
        self.team = team
        self.agreement = Agreement() if models.scorer else None
        self.lock = threading.Lock()  # one decision at a time: the pending list and the files

    def labeler(self, body: dict) -> str | None:
        """The labeler a team member's request names (None on a page for this machine alone)."""
        if not self.team:
            return None
        name = body.get("labeler")
        if not isinstance(name, str) or not LABELER_NAME.fullmatch(name.strip()):
            raise UserError("say who you are: a labeler name of 1 to 40 letters, digits, spaces "
                            "or . ' -")
        return name.strip()

    def score_earlier_rows(self) -> None:
        """Count the rankings already in OUT into the agreement shown on the page."""
        for row in self.store.out.rows:
            self.agreement.add(self.models.scores(row["prompt"], row["responses"]), row["ranking"])

    def next_item(self, body: dict) -> dict:
        labeler = self.labeler(body)
        with self.lock:
            index = self.store.current(labeler)
            counts = self.store.counts(labeler)
        if index is None:
            return {"done": True, "counts": counts}
        prompt = self.store.prompts[index]
        item = {"done": False, "index": index, "prompt": prompt, "counts": counts, "answers": []}
        try:
            item["answers"] = self.models.answers(index, prompt, self.k)
        except UserError as err:  # e.g. a chat control token in the prompt: skip it, go on
            item["problem"] = str(err)
        return item

    def rank(self, body: dict) -> dict:
        index, labeler = body.get("index"), self.labeler(body)
        with self.lock:
            answers = self.models.answers_of.get(self.store.check_pending(index, labeler))
            if answers is None:
                raise UserError(f"prompt {index} has not been shown; reload the page")
            row = self.store.record_ranking(index, answers, body.get("ranking"), labeler)
            elapsed = self.store.record_ms[-1]
            counts = self.store.counts(labeler)
        print(f"label: ranked prompt {index + 1} of {counts['total']} "
              f"(recorded in {elapsed:.2f} ms)", file=sys.stderr, flush=True)
        result = {"recorded": True, "record_ms": elapsed, "counts": counts}
        if self.agreement is not None:
            scores = self.models.scores(row["prompt"], row["responses"])
            with self.lock:
                result.update(scores=scores, agreement=self.agreement.add(scores, row["ranking"]))
        return result

    def set_aside(self, body: dict) -> dict:
        action, note = body.get("action"), body.get("note") or ""
        if not isinstance(note, str):
            raise UserError("the note must be text")
        labeler = self.labeler(body)
        with self.lock:
            self.store.set_aside(body.get("index"), action, note, labeler)
            return {"recorded": True, "counts": self.store.counts(labeler)}

    def feedback(self, body: dict) -> dict:
        labeler = self.labeler(body)
        with self.lock:
            saved = self.store.save_feedback(body.get("messages"), body.get("chosen"),
                                             body.get("rejected"), labeler)
            return {"saved": saved, "counts": self.store.counts(labeler)}

    def stats(self, body: dict) -> dict:
        labeler = self.labeler(body) if self.team and body.get("labeler") else None
        with self.lock:
            result = {**self.info, "team": self.team, "counts": self.store.counts(labeler),
                      "record_ms": self.store.timing()}
            if self.agreement is not None:
                result["agreement"] = self.agreement.overall()
            if self.team:
                result["labelers"] = labeler_agreement(self.store.out.rows)
            return result


# -- the web app ----------------------------------------------------------------------------------
class TokenGate:
    """ASGI middleware of a page served beyond this machine: only requests carrying the server's
    secret token get through, as `?token=` in the link (which also sets a cookie, so the page's
    own requests carry it), the cookie, or an `X-Label-Token` header. Compared in constant time,
    and never logged (uvicorn's access log is off)."""

    def __init__(self, app, token: str, cookie: str):
        self.app, self.token, self.cookie = app, token.encode(), cookie

    def matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.matches(request.query_params.get("token")):
            cookie = (f"{self.cookie}={self.token.decode()}; HttpOnly; SameSite=Strict; "
                      f"Path=/")

            async def send_with_cookie(message):
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message).append("set-cookie", cookie)
                await send(message)
            return await self.app(scope, receive, send_with_cookie)
        if self.matches(request.headers.get("x-label-token")) or \
                self.matches(request.cookies.get(self.cookie)):
            return await self.app(scope, receive, send)
        refusal = JSONResponse({"error": "this server needs its secret token: open the link it "
                                         "printed when it started (…/?token=…)"}, status_code=403)
        await refusal(scope, receive, send)


def build_app(labeling: Labeling, local_only: bool = True, token: str | None = None,
              cookie: str = "rlhf_label") -> Starlette:
    async def page(_request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    async def chat(request: Request) -> Response:
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        try:
            messages = checked_prompt(body.get("messages"), Record("chat", 1, {}))
            if not isinstance(messages, list):
                raise UserError("messages must be a list of chat messages")
            pieces = labeling.models.reply(messages)
        except UserError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return StreamingResponse(pieces, media_type="text/plain; charset=utf-8",
                                 headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", page),
        Route("/api/stats", json_endpoint(labeling.stats)),
        Route("/api/next", json_endpoint(labeling.next_item)),
        Route("/api/rank", json_endpoint(labeling.rank), methods=["POST"]),
        Route("/api/set-aside", json_endpoint(labeling.set_aside), methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/chat/feedback", json_endpoint(labeling.feedback), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    # Answering only requests addressed to this machine by name keeps a page of another site,
    # whose domain was pointed at 127.0.0.1 (DNS rebinding), from reading or writing anything.
    # Beyond this machine, the token is what keeps the rest of the network out.
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(LOCAL_NAMES))] \
        if local_only else []
    if token is not None:
        middleware.append(Middleware(TokenGate, token=token, cookie=cookie))
    return Starlette(routes=routes, middleware=middleware)


def json_endpoint(work: Callable[[dict], dict]):
    """An endpoint that runs `work(body)` in a worker thread (sampling and fsync block) and
    answers its result as JSON; a UserError is the request's mistake (400), said in one line."""
    async def endpoint(request: Request) -> Response:
        body = await json_body(request) if request.method == "POST" else \
            dict(request.query_params)
        if isinstance(body, Response):
            return body
        try:
            return JSONResponse(await run_in_threadpool(work, body))
        except UserError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
    return endpoint


async def json_body(request: Request) -> dict | Response:
    # Requiring application/json makes a browser ask first (CORS preflight) before another site's
    # page may post here; nothing answers that question, so such posts never arrive.
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return JSONResponse({"error": "send JSON (Content-Type: application/json)"},
                            status_code=415)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the request body must be a JSON object"}, status_code=400)
    return body


# -- the command ----------------------------------------------------------------------------------
def checked_settings(args) -> SamplingConfig:
    sampling = SamplingConfig.from_options(args)
    if sampling.temperature == 0:
        raise UserError("--temperature 0 samples the same answer K times, leaving nothing to rank; "
                        "use a temperature above 0, e.g. 1.0")
    return sampling


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the models load, so that a taken port is said at once, not minutes later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        # Listening now, before the address is printed: a client that reads it and connects at
        # once waits in the backlog until the server accepts, instead of being refused.
        listener.listen(128)
    except OSError as err:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); pass another "
                        f"--port (0 picks a free one)") from None
    return listener


def url_of(listener: socket.socket, host: str) -> str:
    port = listener.getsockname()[1]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def cmd_label(args) -> int:
    sampling = checked_settings(args)
    out = checked_out_path(args.out, "--out")
    feedback_out = checked_out_path(args.feedback_out or out.with_name(out.stem + ".chat.jsonl"),
                                    "--feedback-out")
    if feedback_out.resolve() == out.resolve():
        raise UserError("--feedback-out must differ from --out: chat pairs and rankings are two "
                        "formats")
    store = LabelStore.load(args.prompts, out, feedback_out, args.rankings_per_prompt)
    registry = open_registry(args.home)
    policy = resolve_model(registry, args.policy)
    require_causal_lm(policy, "--policy")  # a bad model fails before the port is taken
    if args.reward:
        require_reward_model(resolve_model(registry, args.reward), "--reward")
    listener = listening_socket(args.host, args.port)
    model, tokenizer = load_for_sampling(policy, role="--policy")
    scorer = reward_scorer(resolve_model(registry, args.reward)) if args.reward else None
    info = {"policy": args.policy, "reward": args.reward, "out": str(out),
            "feedback_out": str(feedback_out), "k": args.k, "temperature": sampling.temperature}
    team = args.host not in LOCAL_NAMES
    models = Models(model, tokenizer, sampling, args.seed, scorer)
    models.answers_of.update(collected_answers(args.prompts))  # collected rows: no sampling
    labeling = Labeling(store, models, args.k, info, team=team)
    if scorer is not None:
        labeling.score_earlier_rows()
    # Served beyond this machine, the page is a team's: a new secret per server, in the link.
    token = secrets.token_urlsafe(24) if team else None
    port = listener.getsockname()[1]
    store.open()
    try:
        serve(build_app(labeling, local_only=not team, token=token, cookie=f"rlhf_label_{port}"),
              listener, args.host, store.counts(), token)
    finally:
        store.close()
    counts = store.counts()
    print(f"label: stopped; {counts['ranked']} rankings in {out}, {counts['remaining']} of "
          f"{counts['total']} prompts left", flush=True)
    return 0


def serve(app: Starlette, listener: socket.socket, host: str, counts: dict,
          token: str | None = None) -> None:
    import uvicorn

    done = counts["total"] - counts["remaining"]
    url = url_of(listener, host) + (f"?token={token}" if token else "")
    team = " for a team: give this link to the labelers; each names themselves on the page" \
        if token else ""
    print(f"label: {done} of {counts['total']} prompts done; serving {url}{team} "
          f"(Ctrl-C stops; every submitted ranking is already saved)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn hands Ctrl-C back once it has shut down: the way to stop
        pass
