"""The DreamBooth prompt convention: the instance prompt names the subject as
"[identifier] [class noun]", and the class prompt names the same class noun without it."""

from __future__ import annotations

import re

from raybooth.errors import RayboothError


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
