"""The shipped general sets: the forgetting check's questions and text, and the self-distillation replay prompts."""

import json
import re
from importlib import resources

from tunesmith.data.replay import shipped_replay_prompts
from tunesmith.evaluate.general import general_questions, general_texts, mentions_answer

# Kept as the original 40 were written; "fall" in it is a verb, so echoing the question scores it right.
ANSWER_IN_QUESTION_KNOWN = {"In which season do leaves fall from the trees?"}


def _lines(package: str, *path: str) -> list[str]:
    text = resources.files(package).joinpath(*path).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def test_every_line_of_every_shipped_set_is_a_json_object_with_its_field():
    for package, path, field in [("tunesmith.evaluate", ("general", "questions.jsonl"), "question"),
                                 ("tunesmith.evaluate", ("general", "text.jsonl"), "text"),
                                 ("tunesmith.data", ("replay_prompts.jsonl",), "prompt")]:
        for number, line in enumerate(_lines(package, *path), 1):
            row = json.loads(line)
            assert isinstance(row.get(field), str) and row[field].strip(), f"{path[-1]}:{number}"


def test_the_sets_are_big_enough_to_see_a_few_points_of_forgetting():
    assert len(general_questions()) >= 400
    assert len(general_texts()) >= 100
    assert len(shipped_replay_prompts()) >= 500


def test_every_question_is_unique_and_has_accepted_answers_the_question_does_not_give_away():
    questions = general_questions()
    assert len({q["question"].lower() for q in questions}) == len(questions)
    for q in questions:
        answers = q["answers"]
        assert answers and all(isinstance(a, str) and a.strip() for a in answers), q
        if q["question"] not in ANSWER_IN_QUESTION_KNOWN:
            assert not mentions_answer(q["question"], answers), q  # repeating the question must not score


def test_the_texts_are_unique_paragraphs():
    texts = general_texts()
    assert len(set(texts)) == len(texts) and all(len(t.split()) > 10 for t in texts)


def test_replay_prompts_are_unique_short_and_never_ask_an_evaluation_question():
    prompts = [_words(p) for p in shipped_replay_prompts()]
    assert len(set(prompts)) == len(prompts)
    assert all(len(p.split()) <= 80 for p in prompts)
    questions = [_words(q["question"]) for q in general_questions()]
    assert not [(q, p) for p in prompts for q in questions if q in p]
