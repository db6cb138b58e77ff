"""One interface for every surface (CLI, app, evaluations) over interchangeable backends.

`LocalEngine` runs the model in-process with transformers (the embedded default, CPU or GPU); the
OpenAI-compatible endpoint backend lives in `assistant/client.py`. A `Conversation` is one image
(plus optional normal references) and its chat history; the image is encoded once and reused by every
later turn.

One decision per image: every backend's `analyze` returns the decided `Verdict` (no text yet): the expert's
logit and the language model's P(Yes) to the fixed detection question, fused and calibrated by the checkpoint's
`decision` config (`config.DecisionConfig`), decided once. `inspect` then has the language model write its
reasoning in agreement with it (`agreeing_answer`, `agreeing_stream`): chat follow-ups may discuss the
decision, not contradict it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.cache_utils import Cache

from .checkpoint import load_checkpoint
from .config import Settings
from .domain import DomainModel
from .errors import UsageError
from .image_io import ImageInput, load_image, load_references
from .modeling import AssistantForConditionalGeneration
from .processing import AssistantProcessor
from .profiles import (
    PROFILE_FILE,
    PROFILES_DIR,
    Profile,
    ProfileError,
    check_name,
    check_one_source,
    image_side_fingerprint,
)
from .prompts import (
    DECISION_QUESTIONS,
    DEFECT_QUESTION,
    DETECTION_QUESTION,
    INSPECTION_QUESTION,
    NO,
    REFERENCE_INTRO,
    YES,
    decision_opening,
    first_word_known,
    stated_decision,
    yes_means_anomalous,
)
from .references import PatchBank
from .verdict import Verdict
from .vision import ImageEncoderMixin, ImageEncoding


@dataclass
class Conversation:
    """A chat about one query image (optionally preceded by normal reference images)."""

    image: Image.Image | None = None
    references: list[Image.Image] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)  # {"role": "user"|"assistant", "content": str}
    # The opening words of the next answer, given to the model to continue (e.g. the decided "Yes"); every
    # backend returns answers with these words included.
    answer_prefix: str = ""

    @classmethod
    def start(
        cls, image: ImageInput | None, question: str, references: Sequence[ImageInput] = ()
    ) -> Conversation:
        return cls(
            image=None if image is None else load_image(image, "image"),
            references=load_references(references),
            messages=[{"role": "user", "content": question}],
        )

    def ask(self, question: str) -> Conversation:
        self.messages.append({"role": "user", "content": question})
        return self

    def answer(self, text: str) -> Conversation:
        self.messages.append({"role": "assistant", "content": text})
        self.answer_prefix = ""
        return self

    def opening(self, prefix: str) -> Conversation:
        """This conversation with the next answer starting with `prefix` (a copy; the history is shared)."""
        return replace(self, messages=list(self.messages), answer_prefix=prefix)

    @property
    def images(self) -> list[Image.Image]:
        return [*self.references, self.image] if self.image is not None else []

    def chat(self) -> list[dict]:
        """Messages in the processor's chat-template format; the images open the first user turn, and an
        `answer_prefix` is a last, unfinished assistant message (render it with `continue_final_message`)."""
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("the conversation must end with a user question")
        chat = []
        for index, message in enumerate(self.messages):
            content: list[dict] = [{"type": "text", "text": message["content"]}]
            if index == 0 and self.images:
                intro = (
                    [{"type": "text", "text": REFERENCE_INTRO.format(n=len(self.references)) + "\n"}]
                    if self.references
                    else []
                )
                content = intro + [{"type": "image"} for _ in self.images] + content
            chat.append({"role": message["role"], "content": content})
        if self.answer_prefix:
            chat.append({"role": "assistant", "content": [{"type": "text", "text": self.answer_prefix}]})
        return chat


class Scorer(Protocol):
    """Anything that scores an image: `score(image, references) -> (score, HxW map)`. An external anomaly-map
    source for the ROI tokens (e.g. `assistant.clip.expert.ClipAnomalyExpert`), and a row of the zero-shot report."""

    def score(self, image: Image.Image, references: Sequence[Image.Image] = ()) -> tuple[float, np.ndarray]: ...


class Engine(Protocol):
    def analyze(
        self, image: ImageInput, references: Sequence[ImageInput] = (), profile: str | None = None
    ) -> Verdict:
        """The decided verdict: fused score, decision, both sources, domain, heatmap and boxes; no text.

        Normal `references` or an enrolled `profile` (by name) drive the expert's evidence
        (`config.ReferenceConfig`); a profile also brings its own threshold and domain."""
        ...

    def stream(self, conversation: Conversation, max_new_tokens: int = 256) -> Iterator[str]: ...

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]: ...

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]: ...


def yes_probability(engine: Engine, image: Image.Image, references: Sequence[Image.Image] = ()) -> float:
    """The language model's P(Yes) (against "No") as the first answer token to the fixed detection question."""
    detection = Conversation(image, list(references), [{"role": "user", "content": DETECTION_QUESTION}])
    return engine.choice_probabilities([detection], (YES, NO))[0][YES]


def inspect(
    engine: Engine,
    image: ImageInput,
    references: Sequence[ImageInput] = (),
    question: str = INSPECTION_QUESTION,
    max_new_tokens: int = 256,
    profile: str | None = None,
) -> Verdict:
    """Verdict for one image: the decision, heatmap and boxes, the LLM's reasoning and the defect type.

    The reasoning agrees with the decision (`agreeing_answer`), so the text and the verdict cannot disagree.
    """
    conversation = Conversation.start(image, question, references)
    verdict = engine.analyze(conversation.image, conversation.references, profile)
    reasoning = agreeing_answer(engine, conversation, verdict.anomalous, max_new_tokens).strip()
    defect = None
    if verdict.anomalous:
        conversation.answer(reasoning).ask(DEFECT_QUESTION)
        defect = engine.complete([conversation], 32)[0].strip() or None
    return verdict.model_copy(update={"reasoning": reasoning, "defect": defect})


def _asks_for_decision(conversation: Conversation) -> bool:
    return conversation.messages[-1]["content"].strip() in DECISION_QUESTIONS


def _opening(conversation: Conversation, anomalous: bool) -> tuple[Conversation | None, bool | None]:
    """(the conversation continuing the decided Yes/No, what its last question's "Yes" means), or (None, None)
    for a question whose answer cannot contradict the decision by its first word."""
    polarity = yes_means_anomalous(conversation.messages[-1]["content"])
    if polarity is None:
        return None, None
    return conversation.opening(decision_opening(anomalous, polarity)), polarity


def _contradicts(answer: str, anomalous: bool, polarity: bool | None) -> bool:
    stated = stated_decision(answer)
    return polarity is not None and stated is not None and stated != (anomalous == polarity)


def agreeing_answers(
    engine: Engine, conversations: Sequence[Conversation], decisions: Sequence[bool], max_new_tokens: int = 256
) -> list[str]:
    """Answers (one batch) that may discuss each conversation's decision but not flip it.

    A question asking for the decision (`prompts.DECISION_QUESTIONS`) is answered as a continuation of the
    decided "Yes,"/"No,"; an answer to another yes/no question about defects ("Is it OK?" too: its "Yes" means
    normal, `prompts.yes_means_anomalous`) that opens with the contradicting word is generated again that way.
    Any other question is answered freely.
    """
    openings = [_opening(c, d) for c, d in zip(conversations, decisions, strict=True)]
    prompts = [o if _asks_for_decision(c) else c for c, (o, _) in zip(conversations, openings)]
    answers = engine.complete(prompts, max_new_tokens)
    flipped = [i for i, a in enumerate(answers) if _contradicts(a, decisions[i], openings[i][1])]
    if flipped:
        again = engine.complete([openings[i][0] for i in flipped], max_new_tokens)
        for i, answer in zip(flipped, again):
            answers[i] = answer
    return answers


def agreeing_answer(engine: Engine, conversation: Conversation, anomalous: bool, max_new_tokens: int = 256) -> str:
    return agreeing_answers(engine, [conversation], [anomalous], max_new_tokens)[0]


def agreeing_stream(
    engine: Engine, conversation: Conversation, anomalous: bool, max_new_tokens: int = 256
) -> Iterator[str]:
    """`agreeing_answer`, streamed: the text is held back until its first word is known."""
    opening, polarity = _opening(conversation, anomalous)
    if _asks_for_decision(conversation):
        yield from engine.stream(opening, max_new_tokens)
        return
    held, chunks = "", engine.stream(conversation, max_new_tokens)
    try:
        for chunk in chunks:
            held += chunk
            if first_word_known(held):
                break
        if _contradicts(held, anomalous, polarity):
            chunks.close()  # stops that generation and frees the model before the decided one starts
            yield from engine.stream(opening, max_new_tokens)
            return
        if held:
            yield held
        yield from chunks
    finally:
        chunks.close()  # a reader that went away stops the generation at once


def choice_token_ids(tokenizer, choices: Sequence[str]) -> list[int]:
    """The first token of each choice: what `choice_probabilities` compares (in-process and on our server)."""
    ids = [tokenizer.encode(choice, add_special_tokens=False)[0] for choice in choices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"choices {list(choices)} do not start with distinct tokens")
    return ids


class _StopWhenSet(StoppingCriteria):
    """Ends a generation early once `event` is set (its reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _image_key(images: Sequence[Image.Image], profile: Profile | None = None) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.size}".encode())
        digest.update(image.tobytes())
    if profile is not None:
        digest.update(f"profile:{profile.uid}".encode())
    return digest.hexdigest()


@dataclass
class _Prompt:
    """A batch of conversations as the language model reads it (`LocalEngine._prompt_embeddings`)."""

    embeds: torch.Tensor  # [B, T, H], left-padded, image embeddings merged in
    mask: torch.Tensor  # [B, T]
    input_ids: torch.Tensor  # [B, T]
    encodings: list[ImageEncoding | None]  # each conversation's cached image encoding (None: no image)


@dataclass
class _PromptCache:
    """The KV cache a call left: the image encoding it read and the token ids it holds, in order."""

    encoding: ImageEncoding | None  # the image cache's entry itself: the same object means the same images
    token_ids: list[int]
    cache: Cache

    @classmethod
    def of(cls, prompt: _Prompt, token_ids: list[int], cache: Cache | None) -> _PromptCache | None:
        """What a one-conversation call leaves for the next (None for a batch, or without a cache to continue)."""
        if len(prompt.encodings) != 1 or cache is None or cache.get_seq_length() != len(token_ids):
            return None
        return cls(prompt.encodings[0], token_ids, cache)


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch's forward pass: each row counts from its first real token (as
    `generate` numbers them), so a row scores the same alone or padded in a batch."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def whole_characters(text: str) -> str:
    """The answer without the replacement character a cut-off multi-byte character decodes to (an answer stopped at
    max_new_tokens mid-character), as vLLM's chat completions leave it out: every backend gives the same text."""
    return text.rstrip("\ufffd")


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


class ImageAnalyzer:
    """The image side and its processor: encodes images (an LRU cache by pixel content) and gives verdicts.

    `model` is anything that owns the image-side modules (`vision.ImageEncoderMixin`): the full model, or the
    server's image side alone (`serve/analysis.py`).
    """

    def __init__(
        self,
        model: ImageEncoderMixin,
        processor: AssistantProcessor,
        cache_size: int = 8,
        roi_expert: Scorer | None = None,
        domain: DomainModel | None = None,
        profiles: str | Path | None = None,
    ):
        if model.config.roi.map_source == "external" and roi_expert is None:
            raise ValueError(
                "the model takes its ROI map from an external expert (roi.map_source = 'external'): pass roi_expert "
                "(CLI: --roi-source clip --clip-model SPEC)"
            )
        self.model = model.eval()
        self.processor = processor
        self.roi_expert = roi_expert
        self.domain = domain  # the images the checkpoint knows (None: domain unknown)
        self.profiles = None if profiles is None else Path(profiles)  # the checkpoint folder its profiles live in
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ImageEncoding] = OrderedDict()
        self._banks: OrderedDict[str, PatchBank] = OrderedDict()  # of reference image sets
        self._profiles: dict[str, tuple[tuple | None, Profile]] = {}  # name -> (profile.json's identity, profile)
        self._profile_lock = threading.Lock()
        # One model call at a time; also guards the image cache. A plain Lock, not an RLock: a streaming generator
        # holds it across yields, and Gradio may resume the generator on another worker thread.
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, images: Sequence[Image.Image], profile: Profile | None = None) -> ImageEncoding:
        """Encode a query (last) with its references, cached by pixel content; the analysis compares the query
        with the references (or with `profile`'s memory bank)."""
        with self._lock:
            return self._encode(images, profile)

    def _encode(self, images: Sequence[Image.Image], profile: Profile | None = None) -> ImageEncoding:
        """`encode` for a caller that holds the lock."""
        check_one_source(images[:-1], profile)
        key = _image_key(images, profile)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        bank = profile.bank if profile is not None else self._reference_bank(images[:-1])
        inputs = self.processor.preprocess_images([list(images)], roi_maps=self._roi_maps(images))
        with torch.inference_mode():
            encoding = self.model.encode_images(**{k: v.to(self.device) for k, v in inputs.items()}, bank=bank)
        self._cache[key] = encoding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return encoding

    def _reference_bank(self, references: Sequence[Image.Image]) -> PatchBank | None:
        """The memory bank of a request's normal references (each encoded as a query: whole image and tiles),
        bounded by an even subsample; cached by content."""
        if not references:
            return None
        key = _image_key(references)
        if key not in self._banks:
            bank = self._normal_patches(references).subsampled(self.model.config.reference.max_patches)
            self._banks[key] = bank
            if len(self._banks) > self.cache_size:
                self._banks.popitem(last=False)
        self._banks.move_to_end(key)
        return self._banks[key]

    def _normal_patches(self, images: Sequence[Image.Image]) -> PatchBank:
        crops = torch.from_numpy(np.concatenate([self.processor.image_crops(image, True) for image in images]))
        sizes = torch.tensor([self.processor.model_size((image.height, image.width)) for image in images])
        with torch.inference_mode():
            return self.model.normal_patches(crops.to(self.device), sizes.to(self.device))

    def normal_patches(self, images: Sequence[Image.Image]) -> PatchBank:
        """The (unbounded) memory bank of these normal images, for enrolling a profile."""
        with self._lock:
            return self._normal_patches(images)

    def use_profile(self, profile: Profile) -> str:
        """Make a profile that lives elsewhere (e.g. an evaluation's) available by name; checked like a saved one."""
        if profile.fingerprint != image_side_fingerprint(self.model):
            raise ProfileError(
                f"profile {profile.name!r} was made with another model or other settings; enrol it again with this one"
            )
        self._profiles[profile.name] = (None, replace(profile, bank=profile.bank.to(self.device)))
        return profile.name

    def profile(self, name: str) -> Profile:
        """The enrolled profile `name` of this checkpoint, on the model's device; read again when its file changed
        (`enroll --replace` while a server runs); one made with another model or other settings is refused."""
        check_name(name)
        stamp = None
        if self.profiles is not None:
            described = self.profiles / PROFILES_DIR / name / PROFILE_FILE
            status = described.stat() if described.is_file() else None
            stamp = (status.st_ino, status.st_mtime_ns) if status else None  # written atomically: a new inode
        cached = self._profiles.get(name)
        if cached is not None and (cached[0] is None or cached[0] == stamp):  # None: given by `use_profile`
            return cached[1]
        if self.profiles is None:
            raise ProfileError("this backend has no checkpoint folder to read profiles from")
        with self._profile_lock:  # one reader per load, not one per waiting request
            loaded = Profile.load(
                self.profiles, name, image_side_fingerprint(self.model), self.model.config.vision_config.hidden_size
            )
            self._profiles[name] = (stamp, replace(loaded, bank=loaded.bank.to(self.device)))
        return self._profiles[name][1]

    def _roi_maps(self, images: Sequence[Image.Image]) -> list[np.ndarray] | None:
        """The external expert's map of the query (last image), the earlier images as its normal references."""
        if self.model.config.roi.map_source != "external":
            return None
        return [self.roi_expert.score(images[-1], images[:-1])[1]]

    def in_domain(self, image: Image.Image, references: Sequence[Image.Image] = ()) -> bool | None:
        """Whether the query image looks like the checkpoint's training images (None: domain unknown); the encoding
        is the cached one a question about the image and its references uses anyway."""
        if self.domain is None:
            return None
        return self.encode([*references, image]).analysis.domain_check(0, self.domain)[1]

    def decide(
        self,
        image: Image.Image,
        references: Sequence[Image.Image],
        yes_probability: float | None,
        profile: Profile | None = None,
    ) -> Verdict:
        """The verdict on `image` from its (cached) analysis and the language model's P(Yes); a profile brings
        its memory bank, its threshold and its domain."""
        analysis = self.encode([*references, image], profile).analysis
        decision, domain = self.model.config.decision, self.domain
        if profile is not None:
            decision = decision.model_copy(update={"threshold": profile.threshold})
            domain = profile.domain or domain
        return analysis.verdict(0, image.size, decision, yes_probability, domain)


class LocalEngine(ImageAnalyzer):
    """In-process transformers backend: the full model's image side plus its language model."""

    model: AssistantForConditionalGeneration
    _last_prompt: _PromptCache | None = None  # what the last single-conversation generation left (`_generate`)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        roi_expert: Scorer | None = None,
        settings: Settings | None = None,
        domain: bool = True,
    ) -> LocalEngine:
        """Load any checkpoint folder (`checkpoint.load_checkpoint`); `settings` override the expert/ROI/decision
        config for this run (`config.AssistantConfig.apply_settings`); `domain=False` leaves its domain statistics
        unread (to fit them anew)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model, processor = load_checkpoint(path, dtype, settings)
        statistics = DomainModel.load(path, model.config.vision_config.hidden_size) if domain else None
        return cls(model.to(device), processor, roi_expert=roi_expert, domain=statistics, profiles=path)

    def analyze(
        self, image: ImageInput, references: Sequence[ImageInput] = (), profile: str | None = None
    ) -> Verdict:
        check_one_source(references, profile)  # before any model call
        image, references = load_image(image, "image"), load_references(references)
        chosen = None if profile is None else self.profile(profile)
        return self.decide(image, references, yes_probability(self, image, references), chosen)

    # -- text -----------------------------------------------------------------------------------------
    def _prompt_embeddings(self, conversations: Sequence[Conversation]) -> _Prompt:
        """Left-padded input embeddings with every conversation's cached image embeddings merged in."""
        texts = [
            self.processor.apply_chat_template(
                c.chat(),
                add_generation_prompt=not c.answer_prefix,
                continue_final_message=bool(c.answer_prefix),
                tokenize=False,
            )
            for c in conversations
        ]
        sizes = [[(im.height, im.width) for im in c.images] for c in conversations]
        batch = self.processor.tokenize(texts, sizes, padding_side="left")
        input_ids = batch["input_ids"].to(self.device)
        embeds = self.model.get_input_embeddings()(input_ids)
        encodings = [self._encode(c.images) if c.images else None for c in conversations]
        image_embeddings = [encoding.embeddings for encoding in encodings if encoding is not None]
        if image_embeddings:
            embeds = self.model.model.merge_image_embeddings(input_ids, embeds, torch.cat(image_embeddings))
        return _Prompt(embeds, batch["attention_mask"].to(self.device), input_ids, encodings)

    def _generate(self, conversations: Sequence[Conversation], max_new_tokens: int, **options) -> torch.Tensor:
        """Greedy `generate` over the conversations' prompts (the caller holds the lock): the new token ids.

        One conversation continues the KV cache of the last one where their prompts share a prefix (the same images
        and the same tokens up to there): the next turn of a chat, or inspect's defect question after its reasoning,
        prefills only what is new instead of the whole prompt with its thousands of image tokens.
        """
        prompt = self._prompt_embeddings(conversations)
        last, self._last_prompt = self._last_prompt, None
        reuse = {}
        if len(conversations) == 1 and last is not None and last.encoding is prompt.encodings[0]:
            shared = _common_prefix(last.token_ids, prompt.input_ids[0].tolist())
            if 0 < shared < prompt.input_ids.shape[1]:  # at least one new token to prefill
                if shared < len(last.token_ids):
                    last.cache.crop(shared - len(last.token_ids))
                reuse = {"past_key_values": last.cache}
        output = self.model.generate(
            inputs_embeds=prompt.embeds,
            attention_mask=prompt.mask,
            return_dict_in_generate=True,
            **reuse,
            **self._generation_kwargs(max_new_tokens),
            **options,
        )
        held = prompt.input_ids[0].tolist() + output.sequences[0, :-1].tolist()  # the last token was never fed
        self._last_prompt = _PromptCache.of(prompt, held, output.past_key_values)
        return output.sequences

    def _generation_kwargs(self, max_new_tokens: int) -> dict:
        tokenizer = self.processor.tokenizer
        return {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }

    def complete(self, conversations: Sequence[Conversation], max_new_tokens: int = 256) -> list[str]:
        """Greedy answers for a batch of conversations (one padded generate call)."""
        with self._lock, torch.inference_mode():
            tokens = self._generate(conversations, max_new_tokens)
        answers = [whole_characters(a) for a in self.processor.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        return [c.answer_prefix + answer for c, answer in zip(conversations, answers)]

    def stream(self, conversation: Conversation, max_new_tokens: int = 256) -> Iterator[str]:
        """Yield the answer's text as it is generated (greedy).

        A reader that stops early (a closed browser tab) stops the generation too, before the model is
        released to the next caller.
        """
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
        stop = threading.Event()
        with self._lock:
            errors: list[BaseException] = []

            def generate() -> None:
                try:
                    with torch.inference_mode():
                        self._generate(
                            [conversation],
                            max_new_tokens,
                            streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                        )
                except BaseException as error:  # surfaced in the caller's thread below
                    errors.append(error)
                    streamer.end()

            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            try:
                if conversation.answer_prefix:
                    yield conversation.answer_prefix
                held = ""  # one chunk behind, so the last can lose a cut-off character
                for chunk in streamer:
                    if held:
                        yield held
                    held = chunk
                if whole_characters(held):
                    yield whole_characters(held)
            finally:
                stop.set()
                worker.join()
        if errors:
            raise errors[0]

    def continuation_logprobs(
        self, conversations: Sequence[Conversation], continuations: Sequence[str]
    ) -> list[tuple[float, bool]]:
        """For each conversation, the log-probability of its continuation's tokens as the answer, and whether greedy
        decoding gives exactly those tokens (what lmms-eval's loglikelihood requests ask); one forward pass."""
        tokenizer = self.processor.tokenizer
        targets = [tokenizer(text, add_special_tokens=False).input_ids for text in continuations]
        if not all(targets):
            raise UsageError("a continuation to score is empty")
        width = max(map(len, targets))
        with self._lock, torch.inference_mode():
            self._last_prompt = None  # this call leaves no cache to continue
            prompt = self._prompt_embeddings(conversations)
            pad = tokenizer.pad_token_id or 0  # padded places are masked out and never read
            ids = torch.tensor([t + [pad] * (width - len(t)) for t in targets], device=self.device)
            filled = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in targets], device=self.device)
            mask = torch.cat([prompt.mask, filled.to(prompt.mask)], dim=1)
            output = self.model(
                inputs_embeds=torch.cat([prompt.embeds, self.model.get_input_embeddings()(ids)], dim=1),
                attention_mask=mask,
                position_ids=left_padded_positions(mask),
                logits_to_keep=width + 1,
                use_cache=False,
            )
            logprobs = output.logits[:, :-1].float().log_softmax(-1)  # the prediction of each continuation token
        results = []
        for row, target in zip(logprobs, targets, strict=True):
            wanted = torch.tensor(target, device=row.device)
            chosen = row[: len(target)].gather(1, wanted[:, None]).sum()
            results.append((float(chosen), bool((row[: len(target)].argmax(-1) == wanted).all())))
        return results

    def choice_probabilities(
        self, conversations: Sequence[Conversation], choices: Sequence[str]
    ) -> list[dict[str, float]]:
        """Probabilities of each choice's first token as the next token, renormalised over the choices.

        This is how a chat answer gets a ranking score (e.g. P(Yes) for image AUROC).
        """
        choice_ids = choice_token_ids(self.processor.tokenizer, choices)
        single = len(conversations) == 1  # its KV cache is kept: a reasoning turn about the image starts from it
        with self._lock, torch.inference_mode():
            prompt = self._prompt_embeddings(conversations)
            output = self.model(
                inputs_embeds=prompt.embeds,
                attention_mask=prompt.mask,
                position_ids=left_padded_positions(prompt.mask),
                logits_to_keep=1,
                use_cache=single,
            )
            self._last_prompt = _PromptCache.of(prompt, prompt.input_ids[0].tolist(), output.past_key_values)
            logits = output.logits
        probs = logits[:, -1, choice_ids].float().softmax(-1).cpu()
        return [dict(zip(choices, row.tolist())) for row in probs]
