"""`cptrain demo`'s own sentences: true for the runs it was given."""

from cptrain.demo.embedded import mer_vs_replay


def test_one_seed_each_never_ranks_mer_and_replay():
    for mer, rep in ((5.580, 5.589), (5.7, 5.2)):
        text = mer_vs_replay({"retained_loss": mer}, {"retained_loss": rep})
        assert "cannot tell" in text and f"{mer - rep:+.3f}" in text
        assert "helps on top" not in text and "does not help" not in text
