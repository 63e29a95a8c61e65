"""The DreamBooth prompt convention: the instance prompt names the subject as
"[identifier] [class noun]", and the class prompt names the same class noun without it."""

from __future__ import annotations

import re
from pathlib import Path

from raybooth.errors import RayboothError
from raybooth.models.folders import read_json
from raybooth.models.loading import load_tokenizer
from raybooth.terminal.log import log


def words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def check_prompts(instance_prompt: str, class_prompt: str, class_noun: str | None = None) -> str:
    """The class noun both prompts share, or an error saying what is wrong with them.

    Without an explicit `class_noun`, it is the words both prompts end with ("toy car" in
    "a photo of unqtkn toy car" / "a photo of a toy car"); the identifier is what only the
    instance prompt has.
    """
    instance, klass = words(instance_prompt), words(class_prompt)
    if not instance or not klass:
        raise RayboothError("--instance_prompt and --class_prompt must not be empty")
    if class_noun is not None:
        noun = words(class_noun)
        for name, prompt in (("--instance_prompt", instance), ("--class_prompt", klass)):
            if not _contains(prompt, noun):
                raise RayboothError(f"{name} {' '.join(prompt)!r} does not name the class noun {class_noun!r}")
    else:
        noun = []
        while len(noun) < min(len(instance), len(klass)) and instance[-1 - len(noun)] == klass[-1 - len(noun)]:
            noun.insert(0, instance[-1 - len(noun)])
        if not noun:
            raise RayboothError(
                f"--instance_prompt {instance_prompt!r} does not name the class noun of --class_prompt "
                f"{class_prompt!r}: write both as in \"a photo of unqtkn toy car\" / \"a photo of a toy car\", "
                "or give --class_noun")
    if not set(instance) - set(klass):
        raise RayboothError(f"--instance_prompt {instance_prompt!r} has no identifier that --class_prompt lacks "
                            "(such as unqtkn in \"a photo of unqtkn toy car\")")
    return " ".join(noun)


def _contains(sequence: list[str], part: list[str]) -> bool:
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def instance_prompt(token: str, class_noun: str) -> str:
    return f"a photo of {token} {class_noun}"


def class_prompt(class_noun: str) -> str:
    return f"a photo of a {class_noun}"


def sample_prompts(token: str, class_noun: str) -> list[str]:
    """A few of the DreamBooth paper's evaluation scenes."""
    return [instance_prompt(token, class_noun), f"a {token} {class_noun} on the beach",
            f"a {token} {class_noun} in the snow"]


def check_prompt_lengths(model_dir: Path, prompts: dict[str, str], must_keep: dict[str, list[str]],
                         max_length: int | None = None) -> None:
    """Warn about each prompt (by flag) that the text encoder's context (or `max_length`, from
    --tokenizer_max_length) cuts short, and refuse one whose cut drops words it must keep (the
    identifier, the class noun): training on it would teach nothing about the subject. Loads the
    tokenizer only for a prompt long enough to be cut: every token covers at least one character
    that is not a space."""
    context = int(read_json(model_dir / "tokenizer" / "tokenizer_config.json", "tokenizer config")
                  .get("model_max_length", 77))
    if max_length is not None and max_length > context:
        raise RayboothError(f"--tokenizer_max_length {max_length} is more than the text encoder's {context} tokens")
    context = max_length or context
    long = {flag: prompt for flag, prompt in prompts.items() if len(re.sub(r"\s", "", prompt)) > context - 2}
    if not long:
        return
    tokenizer = load_tokenizer(model_dir)
    limit = min(context, tokenizer.model_max_length) - 2  # the start and end tokens take two places
    for flag, prompt in long.items():
        ids = tokenizer(prompt, truncation=False).input_ids[1:-1]
        if len(ids) <= limit:
            continue
        kept = words(tokenizer.decode(ids[:limit]))  # a word split at the cut is not kept
        lost = [word for word in must_keep.get(flag, []) if word not in kept]
        if lost:
            raise RayboothError(f"{flag} is {len(ids)} tokens, and the text encoder reads {limit}: "
                                f"{' '.join(lost)!r} falls past the cut; shorten the prompt")
        log(f"warning: {flag} is {len(ids)} tokens, and the text encoder reads {limit}: "
            f"{tokenizer.decode(ids[limit:]).strip()!r} is cut off")


def check_captions(model_dir: Path, captions: dict[str, str], identifier: list[str], noun: list[str],
                   max_length: int | None = None) -> None:
    """The photos' own prompts (files/captions.py) against the same rules of length as the
    instance prompt: a caption the text encoder cuts short is warned about, and refused where the
    cut drops the identifier or the class noun it names. One that lacks the identifier is not
    refused (a caption may describe a style, or a photo's other parts), but said, in one line: a
    photo trained without it teaches the identifier nothing."""
    lacking = [Path(path).name for path, caption in captions.items()
               if not set(identifier) <= set(words(caption))]
    if lacking:
        log(f"warning: {len(lacking)} of {len(captions)} captions do not name the identifier "
            f"{' '.join(identifier)!r} ({', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}): "
            "those photos teach it nothing")
    flags = {f"the caption of {Path(path).name}": caption for path, caption in captions.items()}
    keep = {flag: [word for word in identifier + noun if word in words(caption)] for flag, caption in flags.items()}
    check_prompt_lengths(model_dir, flags, keep)
    if max_length is not None:  # --tokenizer_max_length: the training prompts' own cut
        check_prompt_lengths(model_dir, flags, keep, max_length)
