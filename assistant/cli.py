"""`anomaly-assistant` command line: inspect, chat, enroll, profiles, init-tiny, convert, models, pull, and the
serve/eval/train/data families.

`--model` takes a folder, a preset name (`models` lists them; `pull NAME` fetches one ahead of time) or a Hugging
Face Hub id (`defaults.resolve_model`).

Few-shot: `inspect`/`chat` take normal images of the same object (`--reference`, repeatable) or an enrolled product
profile (`--profile NAME`, not both); `enroll NAME --images DIR` makes a profile from normal images and saves it
next to the model (`assistant.profiles`), `profiles` lists the model's. With `--endpoint` the profile's name is sent
to the server, which uses the served checkpoint's profiles (`GET /v1/profiles` lists them).

Each family registers its own sub-commands (`register(subparsers)` in its module). Modules that build the
parser import only argparse-level code; every command imports its implementation when it runs, so
`--help` does not load torch or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable

from .defaults import MODEL_HELP, resolve_model
from .errors import AssistantError, UsageError, one_line
from .options import add_settings_argument, run_settings

COMMAND_FAMILIES = ("assistant.serve.cli", "eval.cli", "training.cli", "data.cli")


def load_engine(args: argparse.Namespace, concurrency: int = 1):
    """The in-process model, or (with --endpoint) the OpenAI-compatible server that serves one."""
    settings = run_settings(args)  # refuses --set with --endpoint
    if args.endpoint:
        from .client import EndpointEngine

        check_backend(args)
        return EndpointEngine(
            args.endpoint, args.served_model, api_key=args.api_key, concurrency=concurrency, timeout=args.timeout
        )
    from .engine import LocalEngine

    return LocalEngine.from_pretrained(resolve_model(args.model), device=args.device, settings=settings)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_settings_argument(parser)


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--endpoint/--served-model/--api-key/--timeout; the group is returned for command-specific options."""
    endpoint = parser.add_argument_group("OpenAI-compatible endpoint (instead of --model)")
    endpoint.add_argument("--endpoint", metavar="URL", help="base URL ending in /v1, e.g. http://127.0.0.1:8000/v1")
    endpoint.add_argument("--served-model", metavar="NAME", help="the model name the endpoint serves")
    endpoint.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, else none")
    endpoint.add_argument("--timeout", type=float, default=300.0, help="seconds per request before retrying")
    return endpoint


def check_backend(args: argparse.Namespace) -> None:
    if args.endpoint and args.model:
        raise UsageError("give either --model or --endpoint, not both")
    if args.endpoint and not args.served_model:
        raise UsageError("--endpoint needs --served-model NAME (the model name the server serves)")


ROI_SOURCES = {"expert": "expert", "clip": "external"}  # --roi-source -> the config's roi.map_source


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within [0, 1]")
    return value


def load_clip_expert(args: argparse.Namespace):
    from .clip.expert import ClipAnomalyExpert

    try:
        return ClipAnomalyExpert.from_spec(args.clip_model, device=args.device, object_name=args.object_name)
    except ValueError as error:
        raise UsageError(f"--clip-model: {error}") from error


def inspection_engine(args: argparse.Namespace):
    """The assistant (its ROI maps optionally from CLIP), or the CLIP expert with the assistant's text if --model."""
    from .engine import LocalEngine

    if "clip" in (args.expert, args.roi_source) and not args.clip_model:
        raise UsageError("--expert clip and --roi-source clip need --clip-model SPEC")
    if args.endpoint:
        if args.expert != "model" or args.roi_source or args.clip_model:
            raise UsageError("--endpoint inspects with the served model's own expert: drop the CLIP options")
        return load_engine(args)
    clip = load_clip_expert(args) if args.clip_model else None
    language = None
    if args.expert == "model" or args.model:
        try:
            roi = {"map_source": ROI_SOURCES[args.roi_source]} if args.roi_source else {}
            language = LocalEngine.from_pretrained(
                resolve_model(args.model), device=args.device, roi_expert=clip, settings=run_settings(args, roi=roi)
            )
        except ValueError as error:
            raise UsageError(str(error)) from error
    if args.expert == "model":
        return language
    from .clip.engine import ClipEngine

    return ClipEngine(clip, threshold=args.threshold, text_engine=language)


def verdict_lines(verdict, profile: str | None = None) -> list[str]:
    """The decision and its sources (the product profile it was compared with, if any), and a warning line when
    the image is not like the model's training images (or the profile's normal images)."""
    label = "ANOMALOUS" if verdict.anomalous else "NORMAL"
    sources = []
    if verdict.expert_score is not None:
        sources.append(f"expert {verdict.expert_score:.3f}")
    if verdict.reference_distance is not None:
        sources.append(f"reference distance {verdict.reference_distance:.3f}")
    if verdict.llm_yes_probability is not None:
        sources.append(f"LLM P(Yes) {verdict.llm_yes_probability:.3f}")
    lines = [f"{label}  score {verdict.score:.3f}" + (f"  ({', '.join(sources)})" if sources else "")]
    if profile is not None:
        lines.append(f"profile: {profile} (compared with its normal images, decided at its own threshold)")
    if verdict.in_domain is False:
        lines.append(
            f"warning: out of domain (domain score {verdict.domain_score:.3f}): this image does not look like the "
            "images the model was trained on, so the verdict is unreliable (`anomaly-assistant info`: what it knows)"
        )
    elif verdict.in_domain is None:
        lines.append("note: domain unknown: this model carries no statistics of its training images")
    return lines


def check_profile_arguments(args: argparse.Namespace) -> None:
    """--profile with --reference is refused before anything loads; a malformed name too (locally and for a server)."""
    if args.profile is None:
        return
    if args.reference:
        raise UsageError("give normal --reference images or a --profile, not both")
    from .profiles import check_name

    check_name(args.profile)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .engine import inspect
    from .image_io import load_image
    from .prompts import INSPECTION_QUESTION

    check_profile_arguments(args)
    image = load_image(args.image)
    references = [load_image(r) for r in args.reference]
    question = args.question or INSPECTION_QUESTION
    engine = inspection_engine(args)
    verdict = inspect(engine, image, references, question, args.max_new_tokens, profile=args.profile)
    if args.heatmap_out:
        from .overlay import blend_heatmap

        blend_heatmap(image, verdict.heatmap, boxes=verdict.boxes).save(args.heatmap_out)
    if args.json:
        print(verdict.model_dump_json())
        return
    for line in verdict_lines(verdict, args.profile):
        print(line)
    for box in verdict.boxes:
        print(f"  region x {box.x0}-{box.x1}, y {box.y0}-{box.y1}  peak {box.score:.2f}")
    if verdict.defect:
        print(f"defect: {verdict.defect}")
    print(verdict.reasoning)


def cmd_chat(args: argparse.Namespace) -> None:
    from .engine import Conversation, agreeing_stream
    from .image_io import load_image

    check_profile_arguments(args)
    image = load_image(args.image)  # a bad file is reported before the model loads
    references = [load_image(r) for r in args.reference]
    engine = load_engine(args)
    verdict = engine.analyze(image, references, args.profile)  # decided once; the answers may discuss it, not flip it
    for line in verdict_lines(verdict, args.profile):
        print(line)
    conversation = None
    print("Ask about the image; an empty line or Ctrl-D ends the chat.")
    while True:
        try:
            question = input("> ").strip()
        except EOFError:
            break
        if not question:
            break
        if conversation is None:
            conversation = Conversation.start(image, question, references)
        else:
            conversation.ask(question)
        answer = []
        for chunk in agreeing_stream(engine, conversation, verdict.anomalous, args.max_new_tokens):
            print(chunk, end="", flush=True)
            answer.append(chunk)
        print()
        conversation.answer("".join(answer))


def cmd_init_tiny(args: argparse.Namespace) -> None:
    from .card import untrained_card
    from .factory import save_assistant, tiny_assistant

    model, processor = tiny_assistant(seed=args.seed, roi=not args.no_roi)
    card = untrained_card("tiny random assistant", f"A tiny random model (seed {args.seed}) for smoke tests.")
    print(save_assistant(model, processor, args.output, card=card))


def cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import load_checkpoint
    from .factory import save_assistant

    source = resolve_model(args.model)
    model, processor = load_checkpoint(source, settings=run_settings(args))
    print(save_assistant(model, processor, args.output, source=source))


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import converted_card, from_llava_onevision
    from .factory import save_assistant
    from .hub import expert_source, llava_source

    llava, expert = llava_source(args.llava), expert_source(args.expert)
    model, processor = from_llava_onevision(llava, expert, token_parts=token_parts(args.token_parts))
    print(save_assistant(model, processor, args.output, card=converted_card(args.llava, expert)))


def token_parts(text: str) -> tuple[str, ...]:
    """`base,expert` -> ("base", "expert"), checked against the known parts."""
    from .config import TOKEN_PARTS

    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    if "base" not in parts or set(parts) - set(TOKEN_PARTS):
        raise UsageError(f"--token-parts {text!r}: a comma list of {', '.join(TOKEN_PARTS)} that includes base")
    return parts


def cmd_models(args: argparse.Namespace) -> None:
    from .presets import describe, get_preset, list_models

    print("| model | kind | parts | LLM reads | tokens at 1024 px (base / expert / ROI) | params | weights | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for name in list_models():
        preset, facts = get_preset(name), describe(get_preset(name))
        tokens = " / ".join(
            f"{count:,}" if part in preset.token_parts else f"({count:,} off)" for part, count in facts.tokens.items()
        )
        print(
            f"| {name} | {preset.kind} | {'; '.join(preset.parts)} | {'+'.join(preset.token_parts)} | {tokens} "
            f"| {facts.parameters / 1e6:,.1f} M | {facts.weights_gb:.2f} GB | {facts.memory_gb:.2f} GB |"
        )
    print("\nweights: bf16; memory: weights + the KV cache of a 1024 px image prompt with 512 text tokens (bf16)")


def cmd_pull(args: argparse.Namespace) -> None:
    from .hub import pull

    print(pull(args.name, force=args.force))


def cmd_info(args: argparse.Namespace) -> None:
    from .card import ModelCard
    from .checkpoint import checkpoint_config
    from .domain import DomainModel

    path = resolve_model(args.model)
    config = checkpoint_config(path)  # a folder that is no checkpoint is refused here
    card = ModelCard.load(path)
    print(card.markdown() if card else f"# {path.name}\n\nno model card: nothing is known about what it was trained on")
    decision = config.decision
    print()
    print(f"- folder: {path}")
    calibration = f"fitted on {decision.fitted_on}" if decision.calibrated else "not calibrated (raw expert sigmoid)"
    print(
        f"- decision: score = sigmoid({decision.expert_weight:.3f} x expert logit + {decision.llm_weight:.3f} x "
        f"logit P(Yes) + {decision.bias:.3f}), anomalous at >= {decision.threshold:g}; {calibration}"
    )
    domain = DomainModel.load(path, config.vision_config.hidden_size)
    print(f"- domain: {domain.describe() if domain else 'unknown (no domain statistics in this checkpoint)'}")


def cmd_fit_domain(args: argparse.Namespace) -> None:
    from .domain import fit_domain, image_paths
    from .engine import LocalEngine

    path = resolve_model(args.model)
    images = image_paths(args.images)
    validation = image_paths(args.validation) if args.validation else None
    engine = LocalEngine.from_pretrained(path, device=args.device, domain=False)  # a damaged file is replaced
    source = args.source or ", ".join(args.images)
    domain = fit_domain(engine, images, validation, source=source, quantile=args.quantile)
    print(f"{domain.save(path)}: {domain.describe()}")


def open_unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within (0, 1)")
    return value


def cmd_enroll(args: argparse.Namespace) -> None:
    from .domain import image_paths
    from .engine import LocalEngine
    from .profiles import check_name, enroll, profile_names

    check_name(args.name)
    path = resolve_model(args.model)
    if args.name in profile_names(path) and not args.replace:
        raise UsageError(
            f"{path} already has a profile {args.name!r} (`anomaly-assistant profiles` describes it): give --replace "
            "to enrol it again, or choose another name"
        )
    import os

    from .profiles import PROFILES_DIR

    writable = path / PROFILES_DIR if (path / PROFILES_DIR).is_dir() else path
    if not os.access(writable, os.W_OK):
        raise UsageError(f"{writable} is not writable: profiles are saved next to the model; copy the model first")
    images = image_paths(args.images)  # a missing folder or one without images is reported before the model loads
    if len(images) < 2:
        raise UsageError(f"a profile needs at least 2 normal images, found {len(images)} in {', '.join(args.images)}")
    engine = LocalEngine.from_pretrained(path, device=args.device, domain=True)
    source = args.source or ", ".join(args.images)
    profile = enroll(engine, args.name, images, false_alarm_rate=args.false_alarm_rate, source=source)
    folder = profile.save(path)
    print(profile.describe())
    print(folder)


def cmd_profiles(args: argparse.Namespace) -> None:
    path = resolve_model(args.model)
    from .profiles import describe_profiles

    described = describe_profiles(path)
    if not described:
        print(
            f"{path} has no product profiles; make one from normal images of a product with "
            f"`anomaly-assistant enroll NAME --images DIR --model {path}`"
        )
    for _, description in described:
        print(description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anomaly-assistant", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an unexpected error (before the command)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    inspect_parser = commands.add_parser("inspect", help="verdict, heatmap, boxes and reasoning for one image")
    inspect_parser.add_argument("image")
    inspect_parser.add_argument("--reference", action="append", default=[], help="a normal image of the same object")
    inspect_parser.add_argument(
        "--profile", metavar="NAME", help="an enrolled product profile of the model (`anomaly-assistant profiles`)"
    )
    inspect_parser.add_argument(
        "--question", default=None, help="what to ask the assistant (default: a full inspection question)"
    )
    inspect_parser.add_argument("--json", action="store_true", help="print the Verdict as JSON")
    inspect_parser.add_argument("--heatmap-out", help="write the heatmap overlay (with boxes) to this image file")
    inspect_parser.add_argument("--max-new-tokens", type=int, default=256)
    inspect_parser.add_argument(
        "--expert",
        choices=("model", "clip"),
        default="model",
        help="who scores and localises: the model's own expert, or the training-free CLIP expert "
        "(its reasoning comes from --model if given, else it is empty)",
    )
    inspect_parser.add_argument(
        "--roi-source",
        choices=tuple(ROI_SOURCES),
        default=None,
        help="map for the model's ROI tokens: its own expert, or the CLIP expert (default: the model config's)",
    )
    inspect_parser.add_argument(
        "--clip-model",
        metavar="SPEC",
        help="open_clip model for the CLIP expert: ARCH[:TAG], ARCH@CHECKPOINT, CONFIG.json or a folder "
        "(see docs/clip_expert.md), e.g. ViT-B-16-plus-240:laion400m_e32",
    )
    inspect_parser.add_argument("--object-name", default="object", help="what the CLIP prompts call the object")
    inspect_parser.add_argument(
        "--threshold",
        type=unit_interval,
        default=0.5,
        help="CLIP expert: score at or above which the image is anomalous and boxes are reported (default 0.5)",
    )
    add_model_arguments(inspect_parser)
    add_endpoint_arguments(inspect_parser)
    inspect_parser.set_defaults(handler=cmd_inspect)

    chat_parser = commands.add_parser("chat", help="multi-turn chat about an image in the terminal")
    chat_parser.add_argument("image")
    chat_parser.add_argument("--reference", action="append", default=[], help="a normal image of the same object")
    chat_parser.add_argument(
        "--profile", metavar="NAME", help="an enrolled product profile of the model (`anomaly-assistant profiles`)"
    )
    chat_parser.add_argument("--max-new-tokens", type=int, default=256)
    add_model_arguments(chat_parser)
    add_endpoint_arguments(chat_parser)
    chat_parser.set_defaults(handler=cmd_chat)

    enroll_parser = commands.add_parser(
        "enroll", help="remember a product's normal look: a profile from normal images, saved next to the model"
    )
    enroll_parser.add_argument("name", help="the profile's name (letters, digits, '.', '_', '-')")
    enroll_parser.add_argument(
        "--images",
        action="extend",
        nargs="+",
        required=True,
        metavar="DIR_OR_GLOB",
        help="normal images of the product: folders (searched recursively), globs or files; repeatable",
    )
    enroll_parser.add_argument("--model", help=MODEL_HELP)
    enroll_parser.add_argument(
        "--false-alarm-rate",
        type=open_unit_interval,
        default=0.05,  # profiles.DEFAULT_FALSE_ALARM_RATE (not imported here: the parser loads no torch)
        help="share of normal images the profile's threshold may flag (default 0.05)",
    )
    enroll_parser.add_argument("--source", help="how to describe the images (default: the paths given)")
    enroll_parser.add_argument("--replace", action="store_true", help="enrol again over an existing profile")
    enroll_parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    enroll_parser.set_defaults(handler=cmd_enroll)

    profiles_parser = commands.add_parser("profiles", help="list a model's enrolled product profiles")
    profiles_parser.add_argument("--model", help=MODEL_HELP)
    profiles_parser.set_defaults(handler=cmd_profiles)

    tiny_parser = commands.add_parser("init-tiny", help="write a tiny random model (for smoke tests)")
    tiny_parser.add_argument("output")
    tiny_parser.add_argument("--seed", type=int, default=0)
    tiny_parser.add_argument("--no-roi", action="store_true", help="build it without ROI tokens")
    tiny_parser.set_defaults(handler=cmd_init_tiny)

    export_parser = commands.add_parser(
        "export", help="write any checkpoint (e.g. the composed demo model) as one full safetensors folder (for vLLM)"
    )
    export_parser.add_argument("output")
    export_parser.add_argument("--model", help=MODEL_HELP)
    add_settings_argument(export_parser)
    export_parser.set_defaults(handler=cmd_export)

    convert_parser = commands.add_parser(
        "convert", help="build an assistant checkpoint from llava-hf + Anomaly-OV weights"
    )
    convert_parser.add_argument(
        "--llava", required=True, help="llava-hf LLaVA-OneVision folder or Hub id (llava-hf/llava-onevision-...)"
    )
    convert_parser.add_argument(
        "--expert",
        help="official expert: a pretrained_expert_*.pth file, or its name or URL (downloaded and verified); "
        "random expert if omitted",
    )
    convert_parser.add_argument("--output", required=True)
    convert_parser.add_argument(
        "--token-parts",
        default="base",
        help="image token parts the LLM reads: base[,expert][,roi] (default base: all a llava-hf LLM was trained "
        "with; more warns)",
    )
    convert_parser.set_defaults(handler=cmd_convert)

    models_parser = commands.add_parser("models", help="the model registry: presets, their parts, tokens and sizes")
    models_parser.set_defaults(handler=cmd_models)

    pull_parser = commands.add_parser(
        "pull", help="fetch and convert what a preset needs into the cache (resumable; see `models`)"
    )
    pull_parser.add_argument("name", help="preset name, e.g. anomaly-ov-0.5b")
    pull_parser.add_argument("--force", action="store_true", help="convert again even when a converted copy exists")
    pull_parser.set_defaults(handler=cmd_pull)

    info_parser = commands.add_parser("info", help="what a model is: its card, decision calibration and domain")
    info_parser.add_argument("--model", help=MODEL_HELP)
    info_parser.set_defaults(handler=cmd_info)

    domain_parser = commands.add_parser(
        "fit-domain", help="describe the images a model knows (domain statistics saved in its folder)"
    )
    domain_parser.add_argument("images", nargs="+", help="folders (searched recursively), globs or image files")
    domain_parser.add_argument("--model", help=MODEL_HELP)
    domain_parser.add_argument(
        "--validation", nargs="+", help="other images of the same domain for the threshold (default: 20%% held out)"
    )
    domain_parser.add_argument(
        "--quantile", type=unit_interval, default=0.99, help="share of in-domain images to keep in (default 0.99)"
    )
    domain_parser.add_argument("--source", help="how to describe the images (default: the paths given)")
    domain_parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    domain_parser.set_defaults(handler=cmd_fit_domain)

    for module_name in COMMAND_FAMILIES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (`error: ...`), 1 an unexpected failure (one line; --debug shows the trace)."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source excerpt
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
        sys.stdout.flush()  # a closed pipe (`| head`) surfaces here, inside the handler below
    except (AssistantError, FileNotFoundError) as error:  # bad input, or a path the user named that is not there
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly, and keep Python's exit-time flush from failing too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file descriptor (captured, replaced): nothing will flush
            pass
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        hint = f"`anomaly-assistant --debug {args.command} ...` shows the traceback"
        print(f"error: {one_line(error)} ({hint})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
