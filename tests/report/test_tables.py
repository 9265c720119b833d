"""report/tables.py: the plain-text loss matrix, metrics line, run report and comparison table
printed to the terminal."""

from cptrain.report.tables import comparison_table, loss_matrix_table, metrics_line, run_report

SUMMARY = {
    "tasks": ["en", "fr"],
    "loss_matrix": [[2.0, 5.25, 4.0], [2.5, 1.5, 4.125]],
    "eval_only": ["de"],
    "loss_before": {"en": 6.0, "fr": 6.5, "de": 7.0},
    "forgetting": 0.5,
    "retained_loss": 2.0,
    "learned_loss": 1.75,
    "eval_only_forgetting": {"de": -2.875},
}


def _cells(line: str) -> list[str]:
    return line.split()


def test_the_loss_matrix_has_a_before_row_then_a_row_per_trained_task():
    lines = loss_matrix_table(["en", "fr"], SUMMARY["loss_matrix"], eval_only=["de"],
                              before={"en": 6.0, "fr": 6.5}).splitlines()
    assert _cells(lines[0]) == ["after", "\\", "on", "en", "fr", "de*"]
    assert _cells(lines[1]) == ["before", "6.000", "6.500", "–"]  # de: not measured before
    assert _cells(lines[2]) == ["en", "2.000", "5.250", "4.000"]
    assert _cells(lines[3]) == ["fr", "2.500", "1.500", "4.125"]
    assert lines[4] == "(* evaluation only: never trained)" and len(lines) == 5
    plain = loss_matrix_table(["en"], [[None]]).splitlines()  # no before, no eval-only tasks
    assert [_cells(x) for x in plain] == [["after", "\\", "on", "en"], ["en", "–"]]
    long = loss_matrix_table(["a-very-long-task-name"], [[1.0]]).splitlines()
    assert long[0].endswith("a-very-long-task-name") and long[1].endswith("1.000")
    assert long[0].index("a-very") > len("after \\ on")  # columns wide enough for the names


def test_the_metrics_line_signs_forgetting_and_names_each_eval_only_task():
    assert metrics_line(SUMMARY) == (
        "forgetting +0.500  retained 2.000  learned 1.750  de forgetting (final − before) -2.875")
    assert metrics_line({}) == "forgetting –  retained –  learned –"


def test_a_run_report_is_title_matrix_and_metrics_and_says_when_incomplete():
    text = run_report(SUMMARY, title="run-a")
    lines = text.splitlines()
    assert lines[0] == "run-a" and _cells(lines[2])[0] == "before"
    assert lines[-1] == metrics_line(SUMMARY)
    partial = run_report({**SUMMARY, "loss_matrix": SUMMARY["loss_matrix"][:1],
                          "complete": False, "loss_before": None})
    assert partial.splitlines()[-1] == "(incomplete run: rows so far)"
    assert not any(line.startswith("before") for line in partial.splitlines())


def test_the_comparison_table_has_one_line_per_method():
    other = {**SUMMARY, "forgetting": -0.25, "grad_cos_mean": 0.125}
    del other["learned_loss"]
    lines = comparison_table([("sequential", SUMMARY), ("replay α=0.25", other)]).splitlines()
    assert _cells(lines[0]) == ["method", "forgetting", "retained", "learned", "en",
                                "start→end", "grad", "cos"]
    assert _cells(lines[1]) == ["sequential", "+0.500", "2.000", "1.750", "2.000→2.500", "–"]
    assert _cells(lines[2]) == ["replay", "α=0.25", "-0.250", "2.000", "–", "2.000→2.500",
                                "+0.125"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_tables_of_nothing_are_headers_only():
    """No runs yet (or no tasks): a header, not a crash."""
    from cptrain.report.tables import comparison_table

    assert comparison_table([]).splitlines()[0].startswith("method")
