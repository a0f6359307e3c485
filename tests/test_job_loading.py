"""Job files are read with PyYAML's safe loader, building plain documents
(text keys, lists, text) without its generic constructor: the data must be
what `yaml.safe_load` gives for every document, plain or not."""

import gc

import pytest
import yaml

from necrocode_dispatch.job import JobError, _yaml_loader, load_job

DOCUMENTS = [
    "tasks:\n  - {id: a, command: 'true'}\n  - {id: b, command: x, depends_on: [a]}\n",
    "a: 1\nb: [x, 'y', 2.5, true, null, ~, 0x1f, 1_000, 1:30]\n",
    "yes: no\non: off\n",
    "base: &b {x: 1, y: two}\nd:\n  <<: *b\n  z: 3\n",
    "a: &x [1, 2]\nb: *x\n",
    "a: &s text\nb: *s\n",
    "&m {a: *m}\n",
    "!!set {a, b}\n",
    "--- !!omap\n- a: 1\n- b: 2\n",
    "1: one\n2: [two]\n",
    "a: !!str 12\nb: !!int '7'\n",
    "t: 2001-12-14t21:59:43.10-05:00\nd: 2002-12-14\n",
    "x: !!binary aGVsbG8=\n",
    "a: 1\na: 2\n",
    "- a\n- b: {c: [d, {e: f}]}\n",
    "plain\n",
    "",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_a_document_reads_as_the_safe_loader_reads_it(text):
    assert repr(yaml.load(text, Loader=_yaml_loader())) == repr(yaml.safe_load(text))


def test_documents_of_one_stream_read_as_with_the_safe_loader():
    text = "a: 1\nb: x\n---\nc: [2, y]\n---\n- &q z\n- *q\n"
    assert list(yaml.load_all(text, Loader=_yaml_loader())) == list(yaml.safe_load_all(text))


def test_an_alias_is_one_object_as_with_the_safe_loader():
    data = yaml.load("- &a [1]\n- *a\n", Loader=_yaml_loader())
    assert data[0] is data[1]


def test_what_the_safe_loader_refuses_is_refused():
    with pytest.raises(yaml.YAMLError):
        yaml.load("? [1, 2]\n: x\n", Loader=_yaml_loader())


def test_a_job_file_with_anchors_and_numbers_loads(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "dispatcher: {max_global_concurrency: 3}\n"
        "x-d: &d {command: 'true', priority: 2}\n"
        "tasks:\n"
        "  - {<<: *d, id: a}\n"
    )
    with pytest.raises(JobError, match="x-d"):
        load_job(path)  # unknown top-level keys are still named
    path.write_text(
        "dispatcher: {max_global_concurrency: 3}\n"
        "tasks:\n"
        "  - &first {id: a, command: 'true', priority: 2}\n"
        "  - {<<: *first, id: b, timeout: 1.5}\n"
    )
    job = load_job(path)
    assert job.config.max_global_concurrency == 3
    assert [(t.id, t.priority) for t in job.tasks] == [("a", 2), ("b", 2)]
    assert job.tasks[1].metadata["command"] == "true"


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("text", ["tasks:\n  - {id: a, command: 'true'}\n", "tasks: [\n"])
def test_the_collector_is_left_as_it_was(tmp_path, enabled, text):
    """The cyclic collector waits while a job loads, and is then as before,
    whether the job loaded or was refused."""
    path = tmp_path / "job.yaml"
    path.write_text(text)
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        try:
            load_job(path)
        except JobError:
            pass
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
