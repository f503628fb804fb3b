"""The demo trains with each hook and prints its table (tiny size, so it cannot rot)."""

from ddp_hooks import catalog, demo


def test_demo_runs_every_hook_and_learns(capsys):
    rows, backend = demo.run(list(catalog.ENTRIES), workers=2, steps=60, batch=32, lr=0.05, seed=0, verbose=False)
    assert backend == "gloo"
    assert [r["hook"] for r in rows] == list(catalog.ENTRIES)
    by_name = {r["hook"]: r for r in rows}
    assert by_name["fp32"]["ratio"] == 1.0
    for r in rows:
        assert r["accuracy"] > 0.75, r  # 60 steps; 10 classes: chance is 0.1
        assert r["bytes_per_step"] > 0
    table = demo.format_table(rows)
    assert "fp32" in table and "vs fp32" in table


def test_demo_cli_rejects_unknown_hook(capsys):
    import pytest

    with pytest.raises(SystemExit):
        demo.main(["--hooks", "nope"])
    assert "unknown hooks" in capsys.readouterr().err


def test_laq_defaults_train_on_minibatches_within_two_points_of_sgd():
    """The demo's settings (2 workers, 300 minibatch steps): LAQ() as constructed by default
    trains like SGD does; its paper's full-gradient rule is LAQ.paper()."""
    rows, _ = demo.run(["fp32", "laq"], workers=2, steps=300, batch=32, lr=0.05, seed=0, verbose=False)
    by_name = {r["hook"]: r for r in rows}
    assert by_name["laq"]["accuracy"] >= by_name["fp32"]["accuracy"] - 0.02, rows
    assert by_name["laq"]["ratio"] > 10, rows  # and it still skips and quantizes


def test_laq_entry_is_the_default_constructor():
    import ddp_hooks as dh

    assert catalog.ENTRIES["laq"].state().config() == dh.LAQ(bits=4).config() == dh.LAQ().config()
