"""The skip-window policy of the step guard on its own: when skipping stops being enough."""
from dwnet.engine.step_guard import SkipWindow, Verdict


def test_skips_within_the_window_ask_for_a_rollback_and_old_ones_expire():
    window = SkipWindow(max_skips=3, window=10)
    assert window.record(1, applied=True) is Verdict.OK
    assert [window.record(s, applied=False) for s in (2, 5)] == [Verdict.SKIPPED, Verdict.SKIPPED]
    assert window.skips_in_window(11) == 2 and window.first_skip() == 2
    assert window.skips_in_window(12) == 1  # step 2 left the window of steps 3..12
    assert window.record(13, applied=False) is Verdict.SKIPPED  # 5 and 13: two in the window
    assert window.record(14, applied=False) is Verdict.ROLLBACK  # 5, 13, 14
    assert window.total_skipped == 4


def test_an_episode_is_open_while_the_window_holds_a_skip():
    window = SkipWindow(max_skips=5, window=4)
    assert window.open_episode(1) == [] and window.first_skip() is None
    window.record(3, applied=False)
    assert window.open_episode(4) == [3] and window.open_episode(6) == [3]
    assert window.open_episode(7) == []  # step 3 left the window at step 7
    window.carry_over([5, 6])  # a resume reopens the episode its checkpoint was saved in
    assert window.first_skip() == 5 and window.skips_in_window(8) == 2


def test_the_window_keeps_its_skips_after_a_rollback_verdict_until_reset():
    window = SkipWindow(max_skips=2, window=100)
    window.record(1, applied=False)
    assert window.record(2, applied=False) is Verdict.ROLLBACK
    assert window.skips_in_window(2) == 2  # the rollback's message counts them
    window.reset()
    assert window.skips_in_window(3) == 0 and window.total_skipped == 2
    assert window.record(4, applied=False) is Verdict.SKIPPED
