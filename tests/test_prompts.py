import re

import pytest

from raybooth.errors import RayboothError
from raybooth.models.prompts import check_prompt_lengths, check_prompts, class_prompt, instance_prompt, sample_prompts


def test_the_class_noun_is_what_both_prompts_end_with():
    assert check_prompts("a photo of unqtkn toy car", "a photo of a toy car") == "toy car"
    assert check_prompts("photo of unqtkn dog", "photo of a dog") == "dog"


def test_an_explicit_class_noun_must_be_in_both_prompts():
    assert check_prompts("unqtkn toy car, studio photo", "a toy car", class_noun="toy car") == "toy car"
    with pytest.raises(RayboothError, match="--instance_prompt .* does not name the class noun 'dog'"):
        check_prompts("a photo of unqtkn", "a photo of a dog", class_noun="dog")


def test_an_instance_prompt_without_the_class_noun_is_refused():
    with pytest.raises(RayboothError, match="does not name the class noun of --class_prompt"):
        check_prompts("a photo of unqtkn", "a photo of a toy car")


def test_an_instance_prompt_needs_an_identifier():
    with pytest.raises(RayboothError, match="no identifier"):
        check_prompts("a photo of a toy car", "a photo of a toy car")


def test_prompts_made_for_the_workflow_pass_the_check():
    assert check_prompts(instance_prompt("sks", "dog"), class_prompt("dog")) == "dog"
    assert all("sks dog" in p for p in sample_prompts("sks", "dog"))


# The tiny model's tokenizer has one token per character, so 75 characters fill its context.
LONG = "in a garden full of tall sunflowers by an old stone wall under a bright blue summer sky, "


def test_a_prompt_cut_short_is_named_and_one_that_loses_the_subject_is_refused(tiny_model_dir, capsys):
    check_prompt_lengths(tiny_model_dir, {"--instance_prompt": "a photo of unqtkn toy car"},
                         {"--instance_prompt": ["unqtkn", "toy", "car"]})
    assert capsys.readouterr().err == ""  # short: the tokenizer is not even loaded

    check_prompt_lengths(tiny_model_dir, {"--instance_prompt": "a photo of unqtkn toy car " + LONG},
                         {"--instance_prompt": ["unqtkn", "toy", "car"]})
    assert re.search(r"warning: --instance_prompt is \d+ tokens, and the text encoder reads 75: '.*sky ?,' is cut off",
                     capsys.readouterr().err)

    with pytest.raises(RayboothError, match="--instance_prompt is .* 'unqtkn toy car' falls past the cut"):
        check_prompt_lengths(tiny_model_dir, {"--instance_prompt": LONG + "a photo of unqtkn toy car"},
                             {"--instance_prompt": ["unqtkn", "toy", "car"]})
