"""Text tasks: templates, dataset sources, BIG-bench JSON files, tokenization and bad inputs,
against hand-written expectations and files written here."""

from __future__ import annotations

import json
import logging
import re
import tarfile

import pytest

from hf_tae.errors import TaeError
from hf_tae.families.text import (
    Template,
    TextTasks,
    bigbench_tasks,
    load_rows,
    load_templates,
    make_digit_skills,
    read_bigbench,
    tasks_from_column,
    tasks_from_templates,
    tokenize_text_tasks,
    train_bpe_tokenizer,
)
from hf_tae.families.text.embedded import SKILLS, skill_templates

RTE = [
    {"premise": f"The cat {i} sat.", "hypothesis": f"A cat {i} sits.", "label": i % 2, "idx": i}
    for i in range(20)
]
IMPLY = "{{premise}} Does this imply {{hypothesis}}? ||| {{ answer_choices[label] }}"


def test_promptsource_template_renders_input_and_target():
    template = Template.from_jinja("imply", IMPLY, "yes ||| no")
    assert template.answer_choices == ["yes", "no"]
    assert template.render(RTE[1]) == ("The cat 1 sat. Does this imply A cat 1 sits.?", "no")
    plain = Template("plain", "premise: {{premise}}", "{{ label }}")
    assert plain.render(RTE[2]) == ("premise: The cat 2 sat.", "0")


def test_template_that_does_not_render_names_template_and_column():
    template = Template.from_jinja(
        "imply", "{{ premis }} ||| {{ answer_choices[label] }}", "y ||| n"
    )
    with pytest.raises(TaeError, match=r"'imply'.*premis"):
        template.render(RTE[0])
    with pytest.raises(TaeError, match="exactly one"):
        Template.from_jinja("two", "a ||| b ||| c")


def test_templates_from_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text(
        "templates:\n"
        f'  - name: imply\n    jinja: "{IMPLY}"\n    answer_choices: "yes ||| no"\n'
        '  - name: plain\n    input: "p: {{premise}}"\n    target: "{{ answer_choices[label] }}"\n'
        "    answer_choices: [entailment, not entailment]\n"
    )
    json_file = tmp_path / "t.json"
    json_file.write_text(
        json.dumps([{"name": "plain", "input": "h: {{hypothesis}}", "target": "{{label}}"}])
    )
    imply, plain = load_templates(yaml_file)
    assert imply.render(RTE[0])[1] == "yes" and plain.render(RTE[3]) == (
        "p: The cat 3 sat.",
        "not entailment",
    )
    assert load_templates(json_file)[0].render(RTE[4]) == ("h: A cat 4 sits.", "0")
    json_file.write_text(
        json.dumps([{"name": "a", "jinja": "x ||| y"}, {"name": "a", "jinja": "x ||| z"}])
    )
    with pytest.raises(TaeError, match="twice"):
        load_templates(json_file)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_templates_as_tasks_on_a_local_rte_file(tmp_path, fmt):
    import pandas as pd

    path = tmp_path / f"rte.{fmt}"
    frame = pd.DataFrame(RTE)
    frame.to_json(path, orient="records", lines=True) if fmt == "json" else frame.to_csv(
        path, index=False
    )
    splits = load_rows(str(path))
    assert list(splits) == ["train"] and len(splits["train"]) == 20
    templates = [Template.from_jinja("imply", IMPLY, "yes ||| no"),
                 Template("plain", "premise: {{premise}}", "{{ label }}")]  # fmt: skip
    tasks = tasks_from_templates(splits, templates, task_groups=[0, 1])
    assert tasks.task_names == ["imply", "plain"] and tasks.task_groups == [0, 1]
    data = tasks.dataset.to_pandas()
    # 2 of 20 rows carved out for validation, 2 for test, per template
    assert data.groupby(["task", "split"]).size().to_dict() == {
        (t, s): n for t in (0, 1) for s, n in (("test", 2), ("train", 16), ("validation", 2))}  # fmt: skip
    row = data[(data.task == 0) & data.input.str.startswith("The cat 7 ")].iloc[0]
    assert (row.input, row.target) == ("The cat 7 sat. Does this imply A cat 7 sits.?", "no")
    # the same source rows land in the same split for every template
    assert sorted(data[(data.task == 0) & (data.split == "test")].input.str[8:10]) == sorted(
        data[(data.task == 1) & (data.split == "test")].input.str[17:19])  # fmt: skip


def test_category_column_as_tasks_and_save_load(tmp_path):
    rows = [{"skill": ["add", "sub", "mul"][i % 3], "q": f"q{i}", "a": f"a{i}"} for i in range(30)]
    tasks = tasks_from_column({"train": rows}, "skill", Template("qa", "{{q}}", "{{a}}"))
    assert tasks.task_names == ["add", "mul", "sub"]
    data = tasks.dataset.to_pandas()
    assert set(data[data.task == 0].input) == {f"q{i}" for i in range(0, 30, 3)}
    tasks.save(tmp_path / "saved")
    again = TextTasks.load(tmp_path / "saved")
    assert again.fingerprint() == tasks.fingerprint() and again.task_names == tasks.task_names


def test_empty_target_and_task_without_rows_raise():
    rows = [{"x": "a", "y": ""}] + [{"x": "b", "y": "c"}] * 9
    with pytest.raises(TaeError, match="empty target"):
        tasks_from_templates({"train": rows}, [Template("t", "{{x}}", "{{y}}")])
    records = [{"task": "a", "split": "train", "input": "x", "target": "y"},
               {"task": "b", "split": "test", "input": "x", "target": "y"}]  # fmt: skip
    with pytest.raises(TaeError, match=r"\['b'\] have no training rows"):
        TextTasks.from_records(records, ["a", "b"])


def _write_task(folder, spec):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps(spec))


def _bigbench_tree(root):
    tasks = root / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks"
    _write_task(
        tasks / "word_sorting",
        {
            "name": "word_sorting",
            "keywords": ["algorithms"],
            "examples": [
                {"input": f"Sort: b{i} a{i}", "target": [f"a{i} b{i}", "other"]} for i in range(10)
            ],
        },
    )
    _write_task(
        tasks / "arithmetic" / "2_digit_subtraction",
        {
            "name": "2_digit_subtraction",
            "keywords": ["arithmetic", "mathematics"],
            "task_prefix": "Q: ",
            "examples": [{"input": f"{i + 10} - 3 =", "target": str(i + 7)} for i in range(10)],
        },
    )
    _write_task(tasks / "implicatures", {
        "name": "implicatures", "keywords": ["common sense"],
        "examples": [{"input": f"Is {i} big?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
                     for i in range(10)]})  # fmt: skip
    _write_task(tasks / "programmatic", {"name": "programmatic", "keywords": ["x"]})
    return tasks


def test_bigbench_reader_on_folder_and_tarball(tmp_path):
    tasks_root = _bigbench_tree(tmp_path)
    found = {t.name: t for t in read_bigbench(tasks_root)}
    assert sorted(found) == ["arithmetic/2_digit_subtraction", "implicatures", "word_sorting"]
    assert found["word_sorting"].rows[3] == {"input": "Sort: b3 a3", "target": "a3 b3"}
    assert found["arithmetic/2_digit_subtraction"].rows[0] == {
        "input": "Q: 10 - 3 =",
        "target": "7",
    }
    assert found["implicatures"].rows[1] == {
        "input": "Is 1 big?\n  choice: yes\n  choice: no",
        "target": "yes",
    }
    assert found["implicatures"].keywords == ("common sense",)
    tarball = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tmp_path / "bigbench-1.0.0", arcname="bigbench-1.0.0")
    from_tar = {t.name: t for t in read_bigbench(tarball)}
    assert {n: t.rows for n, t in from_tar.items()} == {n: t.rows for n, t in found.items()}
    only = read_bigbench(tarball, keywords=["arithmetic"])
    assert [t.name for t in only] == ["arithmetic/2_digit_subtraction"]
    assert [t.name for t in read_bigbench(tasks_root, names=["arithmetic"])] == [
        "arithmetic/2_digit_subtraction"
    ]
    text = bigbench_tasks(tasks_root, names=["word_sorting", "implicatures"])
    assert text.task_names == ["implicatures", "word_sorting"]  # in path order
    assert text.dataset.to_pandas().groupby("split").size().to_dict() == {
        "test": 2,
        "train": 16,
        "validation": 2,
    }
    with pytest.raises(TaeError, match="not in"):
        read_bigbench(tasks_root, names=["nope"])
    with pytest.raises(TaeError, match="no 'examples'"):
        read_bigbench(tasks_root, names=["programmatic"])


def test_digit_skills_answers_and_planted_groups():
    tasks = make_digit_skills(train_per_template=5, eval_per_template=2, seed=3)
    assert tasks.task_groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [n.rsplit("_", 1)[0] for n in tasks.task_names[::3]] == ["max", "min", "zero", "even"]
    current = [skill for skill in SKILLS if skill != "zero_legacy"]
    variant = make_digit_skills(current, train_per_template=5, eval_per_template=2, seed=3)
    answer = {"max": max, "min": min, "zero": lambda d: "yes" if "0" in d else "no",
              "even": lambda d: str(sum(int(c) % 2 == 0 for c in d)),
              "big": lambda d: str(sum(int(c) >= 5 for c in d)),
              "five": lambda d: "yes" if "5" in d else "no"}  # fmt: skip
    for row in variant.dataset.to_list():
        name = variant.task_names[row["task"]]
        digits = re.findall(r"\d", row["input"])
        assert 3 <= len(digits) <= 5 and row["target"] == answer[name.rsplit("_", 1)[0]](digits)
    assert tasks.dataset[0]["input"].startswith("max: ")


def test_digit_skill_instructions_hold_no_digit():
    # a digit in an instruction sits in every input of its template and sets it apart from its
    # siblings (the job split `zero` while one template read "is there a 0 in ...")
    templates, _ = skill_templates(list(SKILLS))
    with_digit = []
    for template in templates:
        source, _ = template.render({"digits": "", "answer": "x"})
        if re.search(r"\d", source):
            with_digit.append(template.name)
    # only the old default's wording, kept on purpose to reproduce it
    assert with_digit == ["zero_legacy_1"]
    legacy = make_digit_skills(["max", "min", "zero_legacy", "even"], seed=3)
    fixed = make_digit_skills(seed=3)
    assert legacy.dataset["target"] == fixed.dataset["target"]
    changed = {fixed.task_names[t] for t, a, b in zip(fixed.dataset["task"], legacy.dataset["input"],
                                                       fixed.dataset["input"], strict=True) if a != b}  # fmt: skip
    assert changed == {"zero_1"}


def test_tokenization_appends_eos_truncates_with_a_count_and_needs_a_pad(caplog):
    tasks = tasks_from_column(
        {"train": [{"c": "a", "x": "one two", "y": "three four five six"}] * 10},
        "c",
        Template("t", "{{x}}", "{{y}}"),
    )
    tokenizer = train_bpe_tokenizer(["one two three four five six"] * 5, vocab_size=60)
    eos = tokenizer.eos_token_id
    with caplog.at_level(logging.WARNING):
        task_set = tokenize_text_tasks(tasks, tokenizer, max_target_length=3)
    assert "10 of 10 targets are longer than max_target_length=3" in caplog.text
    row = task_set.dataset[0]
    assert row["labels"] == tokenizer("three four")["input_ids"] + [eos]
    assert row["input_ids"] == tokenizer("one two")["input_ids"] and row["attention_mask"] == [1, 1]
    full = tokenize_text_tasks(tasks, tokenizer)
    assert full.dataset[0]["labels"] == tokenizer("three four five six")["input_ids"] + [eos]
    tokenizer.pad_token = None
    with pytest.raises(TaeError, match="no pad token"):
        tokenize_text_tasks(tasks, tokenizer)


def test_a_runs_saved_data_reloads_with_its_tokenizer(tmp_path):
    from hf_tae.families import get_family

    family = get_family("instructions")
    args = family.arguments_class(skills=["max", "even"], train_per_template=5, eval_per_template=2)
    tasks = family.load_tasks(args)
    family.save_data(tasks, tmp_path / "data")
    again = family.load_tasks(family.arguments_class(text_tasks=str(tmp_path / "data")))
    for column in ("input_ids", "labels", "task", "split"):
        assert list(again.dataset[column]) == list(tasks.dataset[column]), column
    assert again.source.tokenizer.get_vocab() == tasks.source.tokenizer.get_vocab()
    assert family.planted_groups(again).tolist() == [0, 0, 0, 1, 1, 1]
