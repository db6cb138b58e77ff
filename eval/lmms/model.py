"""`lmms-eval --model anomaly_assistant`: any lmms-eval image task on our model, in-process or over our server.

    lmms-eval --model anomaly_assistant --model_args pretrained=assistant/weights/demo --tasks mme
    lmms-eval --model anomaly_assistant --model_args endpoint=http://127.0.0.1:8000/v1,served_model=ours ...

Requests go through the same `Engine` as `anomaly-assistant eval`: batches of `batch_size` conversations per
generate call (requests in flight for an endpoint), the engine's image cache (a template shared by many questions is
encoded once), greedy decoding. A request's images become one conversation: the last image is the query and any
earlier ones its normal references, the only multi-image form the model has (MMAD's templates). `answer=verdict`
makes answers to yes/no defect questions agree with the model's Verdict, as `eval visa-dr --answer verdict` does (the
app's behaviour); the default, `chat`, is the language model's own answer, as for any other lmms-eval model.
`loglikelihood` needs the in-process model: an OpenAI-compatible endpoint returns no log-probabilities of given text.
"""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Sequence

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from assistant.cli import load_engine
from assistant.engine import Conversation, Engine, agreeing_answers
from assistant.errors import UsageError

from ..cli import ANSWER_MODES

DEFAULT_MAX_NEW_TOKENS = 256


def truncate(text: str, until: Sequence[str]) -> str:
    """The text before the first stop sequence (greedy decoding stopped there would have given the same)."""
    cuts = [text.index(stop) for stop in until if stop and stop in text]
    return text[: min(cuts)] if cuts else text


def conversation(visuals: Sequence, context: str) -> Conversation:
    """A request as one conversation: the last image is the query, earlier images are its normal references."""
    images = [visual for visual in visuals if visual is not None]
    if not all(isinstance(image, Image.Image) for image in images):
        kinds = sorted({type(image).__name__ for image in images if not isinstance(image, Image.Image)})
        raise UsageError(f"anomaly_assistant reads images only; this task gives {', '.join(kinds)}")
    return Conversation.start(images[-1] if images else None, context, images[:-1])


class AnomalyAssistant(lmms):
    """lmms-eval's simple-model interface over our `Engine` (in-process `pretrained=` or `endpoint=`)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        endpoint: str | None = None,
        served_model: str | None = None,
        api_key: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        timeout: float = 300.0,
        settings: str = "",
        answer: str = "chat",
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            raise UsageError(f"anomaly_assistant has no model_args {', '.join(sorted(unused))}")
        if answer not in ANSWER_MODES:
            raise UsageError(f"answer={answer!r}: give one of {', '.join(ANSWER_MODES)}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError(
                "anomaly_assistant runs in one process: batch with --batch_size instead of launching several"
            )
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UsageError(f"--batch_size {batch_size}: give a number of conversations per batch (1 or more)")
        self.answer = answer
        self.batch_size = int(batch_size)
        args = Namespace(
            model=pretrained,
            device=device,
            endpoint=endpoint,
            served_model=served_model,
            api_key=api_key,
            timeout=float(timeout),
            settings=[item for item in str(settings).split(";") if item],  # `--set`, e.g. reference.weight=0
        )
        self.engine: Engine = load_engine(args, concurrency=self.batch_size)

    def _conversations(self, requests: Sequence[Instance]) -> list[Conversation]:
        conversations = []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            conversations.append(conversation(doc_to_visual(self.task_dict[task][split][doc_id]), context))
        return conversations

    def _answers(self, conversations: list[Conversation], max_new_tokens: int) -> list[str]:
        """One batch's answers; with `answer=verdict` the Verdict of each image opens its yes/no defect answers."""
        if self.answer == "chat":
            return self.engine.complete(conversations, max_new_tokens)
        answers = [""] * len(conversations)
        with_image = [i for i, c in enumerate(conversations) if c.image is not None]
        text_only = [i for i, c in enumerate(conversations) if c.image is None]
        if text_only:
            for i, text in zip(text_only, self.engine.complete([conversations[i] for i in text_only], max_new_tokens)):
                answers[i] = text
        if with_image:
            chosen = [conversations[i] for i in with_image]
            decisions = [self.engine.analyze(c.image, c.references).anomalous for c in chosen]
            for i, text in zip(with_image, agreeing_answers(self.engine, chosen, decisions, max_new_tokens)):
                answers[i] = text
        return answers

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, batched by generation settings (`until` cuts them, `max_new_tokens` bounds them)."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        with tqdm(total=len(requests), desc="anomaly_assistant", disable=self.rank != 0) as progress:
            for indices in groups.values():
                settings = requests[indices[0]].args[1]
                until = settings.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new_tokens = int(settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self._answers(self._conversations([requests[i] for i in batch]), max_new_tokens)
                    for index, text in zip(batch, texts, strict=True):
                        answers[index] = truncate(text, until)
                        self.cache_hook.add_partial("generate_until", requests[index].args, answers[index])
                    progress.update(len(batch))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives exactly the continuation) per request."""
        scorer = getattr(self.engine, "continuation_logprobs", None)
        if scorer is None:
            raise UsageError(
                "loglikelihood requests need the in-process model (model_args pretrained=...): an OpenAI-compatible "
                "endpoint returns no log-probabilities of given text"
            )
        results: list[tuple[float, bool]] = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="anomaly_assistant", disable=self.rank != 0):
            batch = requests[start : start + self.batch_size]
            continuations = []
            for request in batch:
                _, target, _, doc_id, task, split = request.args
                continuations.append(target if isinstance(target, str) else target(self.task_dict[task][split][doc_id]))
            results += scorer(self._conversations(batch), continuations)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise UsageError("anomaly_assistant does not run lmms-eval's multi-round generation tasks")
