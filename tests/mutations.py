"""Mutation runner: break one promise at a time in a copy of the repository and check that its tests notice.

    python tests/mutations.py                # every row (a few minutes; the tmpfs tests need root)
    python tests/mutations.py --only NAME    # one row (repeatable)
    python tests/mutations.py --list         # the rows' names

Each row of ROWS names a promise, the edits that break it (in a file of the repository: an exact snippet, which
must occur exactly once, and its replacement) and the pytest node ids that must then fail. For each row the
repository's tracked and untracked-but-not-ignored files are copied into a temporary folder, the edits applied to
the copy, and the tests run there with this interpreter. One line per row:

    caught     the tests failed: the promise is guarded
    SURVIVED   the tests passed on broken code: a gap in the tests
    STALE      a snippet no longer occurs exactly once (the code changed): update the row
    SKIPPED    the tests passed but some were skipped (e.g. tmpfs tests without root): no verdict
    ELSEWHERE  the tests failed, but not as the row's `expect` says (another check caught it, or a crash)
    BROKEN     pytest could not run the tests (a node id that no longer exists, a collection error)

First the tests of the chosen rows run once on an unmodified copy: a test that already fails would make every
mutation look caught. Exit status 0 only when every row is caught.

Add a row whenever a new promise gets a test: the smallest edit that breaks the promise and the tests that guard
it. This file is not part of the default test suite (its name does not start with test_).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "src/train_improved.py"
TIMEOUT_SECONDS = 900  # per row; the slowest rows run real torchrun jobs


@dataclass(frozen=True)
class Row:
    """One promise: the edits that break it and the tests that must then fail."""

    name: str
    edits: tuple[tuple[str, ...], ...]  # (exact snippet, replacement[, file]), in order; file defaults to `path`
    tests: tuple[str, ...]  # pytest node ids
    path: str = SCRIPT
    expect: str | None = None  # a regex the failing tests' output must match: the check that must catch it


CRASH = "tests/test_crash_consistency.py::test_a_crash_after_any_prefix_of_a_save_leaves_a_complete_recent_latest"
FAILED_SAVE = "tests/test_crash_consistency.py::test_a_save_that_fails_mid_write_changes_no_name"
RECOVERY = "tests/test_recovery.py::"
ASYNC = "tests/test_async_checkpoint.py::"
DISK_FULL = "tests/test_disk_full.py::"
RESUME = "tests/test_e2e_resume.py::"
GPU_READY = "tests/test_gpu_ready.py::"
MIRROR = "tests/test_mirror_e2e.py::"
CHAOS = "tests/test_chaos.py::test_seeded_fault_campaign"
MIRROR_UNIT = "tests/test_mirror.py::"
MULTINODE = "tests/test_multinode.py::"
SIGNALS = "tests/test_signals_and_helpers.py::"
MANAGER = "tests/test_checkpoint_manager.py::"
SPEED = "tests/test_gpu_speed.py::"
GPU_CHECK = "tests/test_gpu_check.py::"
PLAN = "src/resume_plan.py"
BOUNDS = "tests/test_bounds_and_words.py::"
ACTS = "tests/test_resume_acts.py::"
PLAN_TABLE = "tests/test_resume_plan.py::test_the_plan_decides_each_situation_as_its_rule_says"


def reported(check: str) -> str:
    """The `expect` of a campaign row: the campaign's report names a violation of `check` ("[1] losses (seed 10...")."""
    return rf"\] {check} \(seed"


ROWS = [
    Row("fsyncs_removed", (
        ("os.fsync(f.fileno())", "pass"),
        ("os.fsync(fout.fileno())", "pass"),
        ("""    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
""", "    return\n"),
    ), (CRASH,)),
    Row("latest_rotated_into_the_backup_before_the_new_file_exists", (
        ("""            latest = self.dir / self.LATEST
            if latest.exists():
                self._place(latest, self.dir / self.BACKUP)
            os.replace(tmp, latest)""", "            os.replace(tmp, latest)"),
        ("""            with open(tmp, "r+b" if reuse else "wb") as f:""",
         """            latest = self.dir / self.LATEST
            if latest.exists():
                self._place(latest, self.dir / self.BACKUP)
            with open(tmp, "r+b" if reuse else "wb") as f:"""),
    ), (CRASH, FAILED_SAVE)),
    Row("a_moment_with_no_latest", (
        ("            os.replace(tmp, latest)\n",
         "            latest.unlink(missing_ok=True)\n            os.replace(tmp, latest)\n"),
    ), (CRASH,)),
    Row("damaged_file_not_set_aside", (
        ("        manager.set_aside(list(decision.set_aside))\n", "        pass\n"),
    ), (RECOVERY + "test_a_damaged_latest_is_set_aside_and_never_becomes_the_backup",)),
    Row("best_and_epoch_as_hard_links", (
        ("self._place(latest, dst, copy=True)", "self._place(latest, dst)"),
    ), (RECOVERY + "test_best_and_epoch_models_survive_a_bad_block_in_the_rolling_chain",)),
    Row("early_log_lines_not_held_for_train_log", (
        ("""    if env.is_main:
        log.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))
""", ""),
    ), (RECOVERY + "test_a_damaged_latest_is_set_aside_and_never_becomes_the_backup",)),
    Row("a_failed_start_leaves_the_folder", (
        ("d.rmdir()", "pass"),
    ), (RECOVERY + "test_a_failed_start_leaves_no_folder_behind",)),
    Row("torchrun_error_file_not_written", (
        ('write_torchrun_error_file(f"error: {error}")', "pass"),
    ), (RECOVERY + "test_torchrun_reports_our_one_line_error_as_the_root_cause",)),
    Row("warnings_printed_per_rank", (
        ("log.setLevel(logging.INFO if env.is_main else logging.ERROR)",
         "log.setLevel(logging.INFO if env.is_main else logging.WARNING)"),
    ), (RECOVERY + "test_a_schedule_change_on_resume_is_explained_once_under_torchrun",)),
    Row("list_checkpoints_not_quiet_on_a_closed_pipe", (
        ("        sys.stdout.flush()  # inside the try", "        pass  # inside the try"),
    ), (RECOVERY + "test_list_checkpoints_marks_an_earlier_validation_loss_and_a_closed_pipe_is_quiet",),
        path="src/list_checkpoints.py"),
    Row("disk_full_gives_up_the_newest_rolling_file", (
        ('for _, path in m.numbered("rolling_step_")[:-1]:', 'for _, path in m.numbered("rolling_step_"):'),
    ), (ASYNC + "test_make_room_gives_up_damaged_then_older_rolling_then_the_backup_and_never_the_newest",)),
    Row("a_dishonest_space_estimate", (
        ("SPACE_MARGIN_BYTES = 1 << 20", "SPACE_MARGIN_BYTES = 16 << 20"),
    ), (ASYNC + "test_the_estimate_is_the_previous_checkpoint_plus_a_stated_margin",
        DISK_FULL + "test_room_for_two_and_a_half_checkpoints_gives_up_the_backup_and_saves_to_the_end")),
    Row("a_false_finished", (
        ("exit_code = 3 if diverged else 5 if logs_error else 4 if unsaved_steps or unsaved_stop else 0",
         "exit_code = 3 if diverged else 5 if logs_error else 0"),
    ), (ASYNC + "test_when_the_final_save_fails_the_run_says_so_last_and_exits_4",)),
    Row("training_on_blind_when_saves_keep_failing", (
        ("                self.watch.exceeded(self.policy.interval_seconds))", "                False)"),
    ), (DISK_FULL + "test_room_for_one_and_a_half_stops_within_the_limit_and_resumes_once_there_is_space",)),
    Row("resumed_optimizer_state_still_a_view_of_the_mmapped_file", (
        ("per_param[key] = value.clone()", "pass"),
    ), (DISK_FULL + "test_room_for_one_and_a_half_stops_within_the_limit_and_resumes_once_there_is_space",)),
    Row("the_budget_free_policy_still_spaces_saves", (
        ("        if self.budget >= 1:", "        if False:"),
    ), (ASYNC + "test_without_a_budget_every_save_is_made_exactly_when_due_however_slow",)),
    Row("the_fence_no_longer_waits_for_the_background_copy", (
        ("self._copied.wait()", "pass"),
    ), (ASYNC + "test_async_snapshot_is_the_state_at_submit_even_if_training_changes_it_after_the_fence",)),
    Row("the_disk_full_error_hidden_behind_torchs_unexpected_pos", (
        ("                        raise out.error from None\n", "                        pass\n"),
    ), (FAILED_SAVE,)),
    # issue 15: the audit's rows
    Row("ddp_buckets_not_settled_before_the_first_resumed_step", (
        ("        settle_ddp_buckets(model, loader, autocast)\n", ""),
    ), (RESUME + "test_four_ranks_kill_9_then_resume_is_bit_exact",)),
    Row("the_policy_never_sees_a_writes_cost", (
        ("write_seconds if self.cfg.async_checkpoint else 0.0", "0.0"),
    ), (ASYNC + "test_a_slow_background_write_stretches_the_save_interval_in_a_real_run",)),
    Row("optimizer_state_not_restored_on_another_world_size", (
        ('    optimizer.load_state_dict(state["optimizer"])\n',
         '    if state["world_size"] == env.world_size:\n        optimizer.load_state_dict(state["optimizer"])\n'),
    ), (GPU_READY + "test_resuming_on_another_world_size_restores_the_optimizer_state_exactly",)),
    Row("metrics_keep_the_lines_of_lost_steps", (
        ('if r.get("step", 0) <= step))', "if True))"),
    ), (RESUME + "test_kill_9_of_every_process_then_resume_is_bit_exact",)),
    # issue 16: the GPU path, at the level CPU allows
    Row("every_visible_gpus_generator_again", (
        ('    if state.get("cuda_scope") == "own device":\n        return states[0] if states else None\n', ""),
    ), (GPU_READY + "test_a_rank_restores_its_own_cuda_generator_from_new_and_old_checkpoints",)),
    Row("compile_forgotten_on_resume", (
        ('LAUNCH_FIELDS = ("resume", "checkpoint_dir", "device")',
         'LAUNCH_FIELDS = ("resume", "checkpoint_dir", "device", "compile")'),
    ), (GPU_READY + "test_compile_and_every_numerics_setting_come_back_on_resume",)),
    Row("the_writers_adamw_implementation_kept_after_load", (
        ('        group["fused"], group["foreach"] = fused, None\n', ""),
    ), (GPU_READY + "test_after_loading_a_cpu_checkpoint_the_optimizer_uses_the_devices_implementation",)),
    Row("nvml_by_cuda_index", (
        ('uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"', "str(getattr(props, 'index', 0))"),
    ), (GPU_READY + "test_nvml_finds_the_gpu_by_uuid_then_pci_bus_id_never_by_cuda_index",), path="src/device_stats.py"),
    Row("nvl_parts_matched_as_sxm", (
        ('("H100 NVL", 835.0), ("H200 NVL", 835.0), ', ""),
    ), (GPU_READY + "test_peak_tflops_tell_the_nvl_and_pcie_parts_from_sxm",), path="src/device_stats.py"),
    Row("deterministic_mode_nan_fills_again", (
        ("        torch.utils.deterministic.fill_uninitialized_memory = False\n", ""),
    ), (GPU_READY + "test_deterministic_mode_does_not_nan_fill_every_allocation",)),
    Row("metrics_block_buffered", (
        ('open(self.path, "a", buffering=1)', 'open(self.path, "a")'),
    ), (GPU_READY + "test_metrics_are_written_through_one_open_file_a_whole_line_at_a_time",)),
    Row("snapshot_buffers_not_from_the_slab", (
        ("buf = self._slab.take(t.shape, t.dtype) if self._slab else None", "buf = None"),
    ), (ASYNC + "test_snapshot_buffers_cut_from_one_slab_hold_about_one_checkpoint_and_write_the_same_file",)),
    # issue 12: one run per folder, no orphaned workers, the mirror
    Row("no_lock_on_the_folder", (
        ("            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "            pass\n"),
    ), (RESUME + "test_a_second_launch_on_a_folder_in_use_exits_2_and_the_first_run_ends_bit_exact",)),
    Row("workers_outlive_their_launcher", (
        ("            stop.watch_launcher()\n", "            pass\n"),
    ), (RESUME + "test_workers_stop_together_save_and_exit_when_torchrun_is_killed",)),
    Row("nothing_copied_to_the_mirror", (
        ("        self.mirror.submit(held or self.manager.lasting_name(names), step, names, self.manager.held)\n",
         "        pass\n"),
    ), (MIRROR + "test_plain_folder_mirror_kill_the_run_delete_the_folder_and_continue_bit_exact",)),
    Row("resume_ignores_the_mirror", (
        ("    mirror = mirror_view(mirror_url) if mirror_url and resume is not None else None",
         "    mirror = None"),
    ), (MIRROR + "test_plain_folder_mirror_kill_the_run_delete_the_folder_and_continue_bit_exact",)),
    Row("a_valid_local_checkpoint_hides_a_newer_mirrored_one", (
        ("    if valid and (not usable or usable[0].step <= valid.step):", "    if valid:", PLAN),
    ), (MIRROR_UNIT + "test_resume_takes_the_mirror_when_it_is_newer_than_the_local_folder",)),
    Row("a_node_without_the_checkpoint_does_not_fetch_it", (
        ("    if not sees and env.local_rank == 0:", "    if not sees and env.is_main:"),
    ), (MULTINODE + "test_nodes_without_shared_storage_each_fetch_the_checkpoint_from_the_mirror_and_resume_"
                    "bit_exact",)),
    Row("nodes_compare_checkpoints_by_name_only", (
        ("        return (path.stat().st_size, records)", "        return (path.stat().st_size,)"),
    ), (MIRROR_UNIT + "test_a_node_that_cannot_see_rank_0s_checkpoint_gets_the_mirrors_copy_of_it",)),
    Row("rank_0s_unmirrored_checkpoint_not_uploaded_for_the_other_nodes", (
        ("        self.submit(local_path, step, names)\n", ""),
    ), (MIRROR_UNIT + "test_when_the_mirror_lacks_rank_0s_checkpoint_rank_0_uploads_it_and_no_node_rolls_back",),
        path="src/mirror.py"),
    Row("a_node_fetches_into_a_folder_another_run_holds", (
        ("        lock.acquire()\n        try:\n            manager.clean_stale_temporaries()",
         "        try:\n            manager.clean_stale_temporaries()"),
    ), (MIRROR_UNIT + "test_a_node_fetches_only_into_a_folder_no_other_run_holds_and_leaves_no_temporaries",)),
    Row("a_killed_fetch_leaves_its_temporaries_on_the_node", (
        ("            manager.clean_stale_temporaries()\n            mirror = open_mirror(",
         "            mirror = open_mirror("),
    ), (MIRROR_UNIT + "test_a_node_fetches_only_into_a_folder_no_other_run_holds_and_leaves_no_temporaries",)),
    Row("the_backoff_holds_back_a_newer_checkpoint", (
        ("self._cond.wait_for(lambda: self._closed or queue.newest is not seen, timeout=delay)",
         "self._cond.wait_for(lambda: self._closed, timeout=delay)"),
    ), (MIRROR_UNIT + "test_a_newer_checkpoint_is_tried_at_once_after_a_failure_not_after_the_backoff",),
        path="src/mirror_upload.py"),
    Row("no_thread_for_the_writer_leaves_the_save_undone", (
        ("""        try:
            self._thread.start()
        except RuntimeError as e:""", """        self._thread.start()
        if False:"""),
    ), (ASYNC + "test_without_a_thread_for_the_writer_the_save_is_made_in_the_training_thread",)),
    Row("a_torn_metrics_line_stops_the_resume", (
        ("""            except json.JSONDecodeError:  # a line a crash cut short, or the zeros a power loss can leave
                torn += line.strip("\\0 \\t") != ""
                continue""", """            except json.JSONDecodeError:
                raise"""),
    ), (GPU_READY + "test_a_metrics_line_cut_short_by_a_crash_never_stops_the_resume",)),
    # issue 25: promises a mutation audit found unguarded
    Row("only_the_first_fallback_candidate_verified", (
        ('            wanted = verify == "all" or (verify == "first" and not any(f.valid for f in files))',
         "            wanted = not files"),
    ), (RECOVERY + "test_every_fallback_candidate_is_verified_before_use",)),
    Row("the_best_validation_loss_forgotten_on_resume", (
        ('self.best_val_loss = state["best_val_loss"]', 'self.best_val_loss = None'),
    ), (RECOVERY + "test_the_best_validation_loss_of_the_whole_run_survives_a_resume",)),
    Row("a_changed_weight_decay_ignored_on_resume", (
        ('    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay\n', ""),
    ), ("tests/test_checkpoint_manager.py::test_optimizer_settings_changed_on_resume_are_what_the_resumed_steps_use",)),
    Row("a_best_copy_that_does_not_fit_fails_the_save", (
        ("""                log.error("%s NOT WRITTEN at step %d: %s. latest.pt holds this step", dst.name, step, e)
                continue""", """                raise"""),
    ), ("tests/test_checkpoint_manager.py::test_a_best_copy_that_does_not_fit_still_counts_the_save_and_says_so",)),
    Row("the_trainer_logs_the_credentials_in_the_mirror_url", (
        ('    return {k: redact_url(v) if k == "mirror" else v for k, v in settings.items()}',
         "    return dict(settings)"),
    ), (MIRROR + "test_credentials_in_the_mirror_url_never_reach_a_log_line",)),
    Row("the_mirror_logs_the_credentials_in_its_url", (
        ("        self.shown_url = redact_url(url)", "        self.shown_url = url"),
    ), (MIRROR + "test_credentials_in_the_mirror_url_never_reach_a_log_line",), path="src/mirror_store.py"),
    Row("a_redactor_that_stops_at_the_first_slash", (
        ("    clean = split_userinfo(url)[0]\n",
         "    clean = url if '/' in url.partition('://')[2].partition('@')[0] else split_userinfo(url)[0]\n"),
    ), (MIRROR + "test_credentials_in_the_mirror_url_never_reach_a_log_line",), path="src/mirror_messages.py"),
    # issue 22: no silent hang, no silent death
    Row("reporting_a_stop_can_raise_on_a_broken_stderr", (
        ("    with contextlib.suppress(OSError):\n        os.write(2, text.encode())",
         "    if True:\n        os.write(2, text.encode())"),
    ), (SIGNALS + "test_a_signal_is_still_a_graceful_stop_when_stderr_is_a_pipe_nobody_reads",
        SIGNALS + "test_a_worker_whose_launcher_died_with_its_stderr_still_stops")),
    Row("no_writable_descriptor_where_flock_needs_one", (
        ("if e.errno == errno.EBADF and fcntl", "if False and fcntl"),
    ), (MANAGER + "test_the_folder_lock_works_where_flock_needs_a_writable_descriptor",)),
    Row("a_file_system_without_locks_is_a_traceback", (
        ("                os.close(fd)  # ENOLCK, EOPNOTSUPP: this file system gives no working locks\n",
         "                raise\n"),
    ), (MANAGER + "test_a_file_system_without_locks_is_a_clear_error_that_leaves_nothing_behind",)),
    Row("a_dead_holders_lock_refused_at_once", (
        ("if self._holder_alive(holder) or (deadline is not None and now >= deadline):", "if True:"),
    ), (MANAGER + "test_a_lock_kept_for_a_dead_holder_is_waited_for_with_a_bound",)),
    Row("a_stuck_write_never_counts_as_failing", (
        ("        if in_flight and self.stuck_step != in_flight[0] and self._wait_left_seconds() <= 0:",
         "        if False:"),
    ), (ASYNC + "test_a_write_stuck_in_the_kernel_counts_as_failing_and_never_hangs_the_run",)),
    Row("a_save_waits_for_a_stuck_write_without_bound", (
        ("            if self.writer.wait(min(left, 5.0 if quiet else self.NARRATE_EVERY_SECONDS)):",
         "            if self.writer.wait():"),
    ), (ASYNC + "test_a_write_stuck_in_the_kernel_counts_as_failing_and_never_hangs_the_run",
        ASYNC + "test_a_stuck_write_is_waited_for_within_the_unsaved_limit_and_said_and_the_run_exits_naming_the_"
                "unsaved_steps")),
    Row("a_failed_log_write_stops_no_rank", (
        ("bool(metrics.error or tb.error)", "False"),
    ), (RECOVERY + "test_a_log_write_failing_on_rank_0_stops_every_rank_at_once_with_a_checkpoint",)),
    Row("a_crash_not_in_train_log", (
        ('        log.exception("CRASHED on rank %d", env.rank if env else 0)\n', ""),
    ), (RECOVERY + "test_a_crash_is_written_to_train_log_with_its_traceback",)),
    Row("the_tokenizer_downloaded_as_tiktoken_does", (
        ("    import gpt2_tokenizer\n    return gpt2_tokenizer.load()\n",
         "    import tiktoken\n    return tiktoken.get_encoding(\"gpt2\")\n"),
    ), (SIGNALS + "test_samples_need_no_network_and_no_tokenizer_cache",)),
    Row("the_tokenizer_from_a_cache_prepare_data_may_not_have", (
        ("    import gpt2_tokenizer\n    try:\n        return gpt2_tokenizer.load()",
         "    import gpt2_tokenizer, tiktoken\n    try:\n        return tiktoken.get_encoding(\"gpt2\")"),
    ), ("tests/test_prepare_data.py::test_a_fresh_machine_without_network_or_tiktoken_cache_prepares_the_default_data",),
        path="src/prepare_data.py"),
    # issue 23: every line a user reads is true
    Row("rank_1_gives_a_false_final_verdict", (
        ("    if env.is_main:  # only rank 0 knows which step is on disk", "    if True:  # only rank 0 knows which step is on disk"),
    ), (ASYNC + "test_only_rank_0_gives_the_final_verdict_on_what_is_saved",)),
    Row("a_repeated_save_error_in_full_every_time", (
        ("        if again:\n", "        if False:\n"),
    ), (ASYNC + "test_when_the_final_save_fails_the_run_says_so_last_and_exits_4",)),
    Row("a_shorter_interval_again_goes_unsaid", (
        ("            elif stretch < self.stretch:  # the cost fell", "            elif False:  # the cost fell"),
    ), (ASYNC + "test_policy_stretches_the_interval_to_stay_within_the_budget",)),
    Row("mirror_behind_said_when_it_holds_the_step", (
        ('        if not status["submitted"]:', "        if False:"),
    ), (MIRROR + "test_a_resumed_run_with_nothing_new_to_save_finds_its_checkpoint_on_the_mirror",), path="src/mirror.py"),
    Row("no_word_of_a_run_that_never_leaves_warm_up", (
        ("        if self.run.total_steps < cfg.warmup_steps:", "        if False:"),
    ), ("tests/test_monitoring.py::test_a_newcomer_is_told_at_start_about_long_steps_and_a_run_that_never_leaves_"
        "warm_up",)),
    Row("a_long_step_shows_no_progress", (
        ("                progress=reporter.micro_progress)", "                )"),
    ), ("tests/test_monitoring.py::test_a_newcomer_is_told_at_start_about_long_steps_and_a_run_that_never_leaves_"
        "warm_up",)),
    Row("resume_training_sh_on_4_processes_whatever_the_run_had", (
        ('  NGPU=$("$PYTHON" src/list_checkpoints.py --checkpoint_dir "$CHECKPOINT_DIR" --world_size 2>/dev/null || echo 4)',
         "  NGPU=4"),
    ), (SIGNALS + "test_resume_training_sh_continues_the_run_with_its_saved_settings",), path="resume_training.sh"),
    Row("an_inherited_batch_size_that_no_longer_divides_fails", (
        ('    if "batch_size" not in flags and world_size != point.world_size and cfg.batch_size != "auto":',
         "    if False:"),
    ), (SIGNALS + "test_resume_training_sh_continues_the_run_with_its_saved_settings",)),
    Row("a_user_error_retried_by_torchrun", (
        ("    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    os.kill(os.getppid(), signal.SIGTERM)\n", "    return\n"),
    ), (SIGNALS + "test_resume_training_sh_continues_the_run_with_its_saved_settings",)),
    Row("a_gap_said_the_wrong_way_round", (
        ("'below (better than)' if gap < 0 else 'above (worse than)'",
         "'above (worse than)' if gap < 0 else 'below (better than)'"),
    ), ("tests/test_compare_runs.py::test_verdict_numbers_are_the_hand_computed_ones",), path="src/compare_runs.py"),
    Row("the_mirror_listing_shows_historical_names", (
        ("    return names + [T.CheckpointManager.LATEST] if entry is newest else names", '    return entry["names"]'),
    ), (MIRROR + "test_list_checkpoints_lists_the_mirror_and_verifies_it",), path="src/list_checkpoints.py"),
    # issue 21 (part): a mirror you can trust
    Row("a_mirror_outage_blocks_a_restart_with_a_local_checkpoint", (
        ("    if s.mirror.error:\n        if valid:", "    if s.mirror.error:\n        if False:", PLAN),
    ), (MIRROR + "test_a_mirror_outage_never_blocks_a_restart_that_has_a_valid_local_checkpoint",)),
    Row("the_upload_probe_blocks_a_resume", (
        ("            if new_run:\n                raise\n", "            raise\n"),
    ), (MIRROR + "test_read_only_credentials_can_resume_from_the_mirror",)),
    Row("the_mirror_url_stored_with_its_credentials", (
        ("args=settings_without_secrets(dataclasses.asdict(cfg)),", "args=dataclasses.asdict(cfg),"),
    ), (MIRROR + "test_credentials_in_the_mirror_url_never_reach_a_log_line",)),
    Row("a_lagging_listing_deletes_at_first_sight", (
        ("        return {key for key, since in self.suspects.items() if since < now and now - since >= "
         "self.orphan_grace_seconds}", "        return set(suspects)"),
    ), (MIRROR_UNIT + "test_a_lagging_listing_never_deletes_a_committed_copy",), path="src/mirror_store.py"),
    Row("a_short_download_is_not_tried_again", (
        ('        if problem is not None and "bytes instead of" in problem:', "        if False:"),
    ), (MIRROR_UNIT + "test_a_short_download_is_tried_again_before_falling_back",), path="src/mirror_fetch.py"),
    Row("no_word_of_credentials_that_were_not_stored", (
        ('    if point.mirror_credentials_removed and cfg.mirror and "mirror" not in flags:', "    if False:"),
    ), (MIRROR + "test_credentials_in_the_mirror_url_never_reach_a_log_line",)),
    Row("a_new_run_mixes_into_another_runs_mirror", (
        ('    new_run = point is None or point.lineage == "fork"', "    new_run = False"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",)),
    Row("a_mirror_check_that_lets_a_new_run_in_among_others", (
        ("        if new_run and (runs := self.runs()):", "        if False and (runs := self.runs()):"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",), path="src/mirror.py"),
    Row("several_runs_on_a_url_and_one_is_taken_without_asking", (
        ("        if len(runs) > 1:", "        if False:"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",), path=PLAN),
    Row("retention_deletes_another_runs_copies", (
        ('        committed = [c for c in committed if c["run"] == self.run_id]  # another run\'s copies are never touched',
         "        pass"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",), path="src/mirror_store.py"),
    Row("a_resume_takes_another_runs_newer_copy", (
        ("    mine = [c for c in copies if c.run == run]", "    mine = list(copies)"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints", PLAN_TABLE), path=PLAN),
    Row("a_rollback_continues_as_the_same_run", (
        ("run_id=decision.run if continuing else uuid.uuid4().hex[:12],",
         "run_id=decision.run if continuing else point.run_id,"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",)),
    # a mutation pass over the code the seam restructuring moved (issue 25): the survivors, each with its test now
    Row("the_stop_for_failing_saves_never_tries_its_save", (
        ('("nothing saved too long", unsaved_stop)', '("nothing saved too long", False)'),
    ), (ASYNC + "test_when_saves_failed_too_long_the_stop_saves_and_still_exits_4",)),
    Row("a_stop_for_failing_saves_exits_0_once_its_save_works", (
        ("5 if logs_error else 4 if unsaved_steps or unsaved_stop else 0", "5 if logs_error else 4 if unsaved_steps else 0"),
    ), (ASYNC + "test_when_saves_failed_too_long_the_stop_saves_and_still_exits_4",)),
    Row("the_runs_time_restarts_at_each_resume", (
        ('        self.elapsed_before_seconds = state["elapsed_seconds"]', "        self.elapsed_before_seconds = 0.0"),
    ), (RECOVERY + "test_the_best_validation_loss_of_the_whole_run_survives_a_resume",)),
    Row("the_mirror_is_handed_only_two_names", (
        ("lasting_name(names), step, names, self.manager.held)",
         "lasting_name(names), step, names[:2], self.manager.held)"),
    ), (MIRROR + "test_list_checkpoints_lists_the_mirror_and_verifies_it",)),
    Row("a_restart_counts_no_lost_steps", (
        ("        lost = max(0, last_logged_step - step)", "        lost = 0"),
    ), (RESUME + "test_torchrun_restarts_after_a_worker_is_killed_and_the_run_ends_bit_exact",)),
    Row("a_resumed_run_counts_from_step_0_as_unsaved", (
        ("self.watch = UnsavedWatch(state.step, cfg.max_unsaved_minutes)", "self.watch = UnsavedWatch(0, cfg.max_unsaved_minutes)"),
    ), (MIRROR + "test_a_resumed_run_with_nothing_new_to_save_finds_its_checkpoint_on_the_mirror",)),
    Row("a_best_upload_is_skipped_when_uploads_fall_behind", (
        ('best="best" in kinds)', "best=False)"),
    ), (MIRROR_UNIT + "test_uploads_that_fall_behind_skip_to_the_newest",), path="src/mirror_upload.py"),
    # issue 24: fast on the GPU you have (the parts CPU can check)
    Row("not_compiled_by_default_on_cuda", (
        ('return cfg.compile if cfg.compile is not None else device.type == "cuda"',
         "return cfg.compile if cfg.compile is not None else False"),
    ), (SPEED + "test_compile_is_on_by_default_on_cuda_off_on_cpu_and_no_compile_opts_out",)),
    Row("compiling_not_announced", (
        ('log.info("compiling the model with torch.compile', 'log.debug("compiling the model with torch.compile'),
    ), (SPEED + "test_a_compiled_run_says_it_is_compiling_and_then_how_long_the_first_step_took",)),
    Row("the_micro_batch_probe_draws_from_the_random_streams", (
        ('    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):',
         "    with contextlib.nullcontext():"),
    ), (SPEED + "test_batch_size_auto_picks_the_largest_micro_batch_that_fits_and_learns_the_same",)),
    Row("the_micro_batch_probe_keeps_the_smallest_that_fits", (
        ("                lo = mid\n", "                lo = max(lo, 0)\n                hi = mid - 1\n"),
    ), (SPEED + "test_batch_size_auto_picks_the_largest_micro_batch_that_fits_and_learns_the_same",)),
    Row("auto_on_resume_forgets_the_checkpoints_choice", (
        ('    if (recorded.get("device") == device_name(env.device)', '    if (False and recorded.get("device")'),
    ), (SPEED + "test_auto_on_resume_keeps_the_checkpoints_choice_on_the_same_device_and_continues_bit_exact",)),
    Row("fp8_never_says_it_will_be_slower", (
        ("        if n_embd <= widest and all(", "        if False and all("),
    ), (SPEED + "test_fp8_says_at_start_when_it_is_expected_to_be_slower_from_what_was_measured",), path="src/fp8.py"),
    Row("gpu_check_only_forgets_what_an_item_needs", (
        ("        if wanted & NEEDS_ITEM_2:\n            wanted.add(2)\n", ""),
    ), (GPU_CHECK + "test_gpu_check_only_runs_the_items_asked_for_and_those_they_need",), path="benchmarks/gpu_check.py"),
    # issue 21.7: parallel parts
    Row("parallel_parts_completed_out_of_order", (
        ('MultipartUpload=dict(Parts=parts)', 'MultipartUpload=dict(Parts=parts[::-1])'),
    ), (MIRROR_UNIT + "test_an_upload_commits_blob_then_manifest_and_fetch_brings_it_back",), path="src/mirror_transfer.py"),
    # issue 21.3: an outage never fills the disk
    Row("a_pending_best_is_never_superseded", (
        ("return not self.epoch and (not self.best or newer.best)", "return not self.epoch and not self.best"),
    ), (MIRROR_UNIT + "test_an_outage_holds_back_only_the_newest_and_the_newest_best",), path="src/mirror_queue.py"),
    Row("an_outage_holds_back_every_best_until_the_disk_is_full", (  # the uploader before issue 21.3
        ("return not self.epoch and (not self.best or newer.best)", "return not self.epoch and not self.best"),
        ('            if job.state != "pending" or job is self._queue.current:\n', "            if True:\n",
         "src/mirror_upload.py"),
    ), (DISK_FULL + "test_a_mirror_down_through_many_best_saves_never_fills_the_disk_and_the_newest_goes_up_first",),
        path="src/mirror_queue.py"),
    Row("the_oldest_pending_upload_goes_first", (
        ("        job = newest\n", "        job = oldest\n"),
    ), (MIRROR_UNIT + "test_an_outage_holds_back_only_the_newest_and_the_newest_best",), path="src/mirror_queue.py"),
    Row("the_disk_guard_never_takes_back_a_file_held_for_the_mirror", (
        ('        held = m.held.unshared()\n', '        held = []\n'),
    ), (MIRROR_UNIT + "test_the_disk_guard_takes_back_a_file_held_only_for_the_mirror_before_any_checkpoint",)),
    Row("a_failed_upload_is_retried_though_a_newer_one_supersedes_it", (
        ('        if any(j.seq > job.seq and job.superseded_by(j) for j in self.pending):\n'
         '            self.retire(job, "skipped")\n', ""),
    ), (MIRROR_UNIT + "test_uploads_that_fall_behind_skip_to_the_newest",
        MIRROR_UNIT + "test_an_outage_holds_back_only_the_newest_and_the_newest_best"), path="src/mirror_queue.py"),
    Row("a_close_during_a_failing_upload_leaves_it_pending", (
        ("                    for job in list(queue.pending):\n                        queue.retire(job, \"skipped\")\n", ""),
    ), (MIRROR_UNIT + "test_closing_while_an_upload_is_failing_lets_go_of_every_held_file",), path="src/mirror_upload.py"),
    # issue 20: checkpoint names are defined once, by the manager; the mirror asks it
    Row("the_mirror_parses_checkpoint_names_itself", (
        ('kinds = {c["manifest_key"]: self.kinds(c["names"]) for c in committed}',
         'kinds = {c["manifest_key"]: frozenset({"epoch"} if any(n.startswith("epoch_") for n in c["names"]) else '
         '{"rolling"}) for c in committed}'),
    ), (MIRROR_UNIT + "test_the_mirror_keeps_copies_by_what_the_folders_owner_says_each_name_is_kept_for",),
        path="src/mirror_store.py"),
    Row("a_file_without_a_lasting_name_is_kept_for_nothing", (
        ('        if any(cls.number_in(n, "rolling_step_") is not None for n in names) or not kinds:',
         '        if any(cls.number_in(n, "rolling_step_") is not None for n in names):'),
    ), ("tests/test_checkpoint_manager.py::test_kinds_say_what_each_save_is_kept_for_by_its_names",)),
    Row("an_epoch_file_is_not_kept_for_good_on_the_mirror", (
        ('        kinds = {"epoch"} if any(cls.number_in(n, "epoch_") is not None for n in names) else set()',
         '        kinds = set()'),
    ), (MIRROR_UNIT + "test_remote_retention_keeps_last_n_rolling_every_epoch_the_newest_best_and_always_the_newest",)),
    Row("a_node_sharing_upload_belongs_to_no_run", (
        ("check=False, run_id=run_id, parent=parent)  # the run's own", "check=False, parent=parent)"),
    ), (MIRROR_UNIT + "test_when_the_mirror_lacks_rank_0s_checkpoint_rank_0_uploads_it_and_no_node_rolls_back",)),
    Row("uploads_held_through_the_rolling_name", (
        ('        return self.dir / (epoch[0] if epoch else self.BEST if self.BEST in names else names[0])',
         "        return self.dir / names[0]"),
    ), (MIRROR_UNIT + "test_the_disk_guard_takes_back_a_file_held_only_for_the_mirror_before_any_checkpoint",)),
    Row("files_for_the_mirror_not_held_on_disk", (
        ("                os.link(path, link)\n", "                raise OSError('no links')\n"),
    ), (MIRROR_UNIT + "test_uploads_that_fall_behind_skip_to_the_newest",)),
    Row("the_mirror_always_said_to_hold_the_last_checkpoint", (
        ('        made_it = made_it and status["committed_step"] == saved_step', "        made_it = True"),
    ), (MIRROR + "test_a_mirror_outage_never_blocks_a_restart_that_has_a_valid_local_checkpoint",), path="src/mirror.py"),
    Row("a_mirror_copy_of_the_same_step_downloaded_over_the_local_one", (
        ("usable[0].step <= valid.step", "usable[0].step < valid.step"),
    ), (MIRROR_UNIT + "test_resume_takes_the_mirror_when_it_is_newer_than_the_local_folder", PLAN_TABLE), path=PLAN),
    Row("a_rollback_keeps_the_abandoned_later_checkpoints_under_their_names", (
        ('        if decision.lineage == "rollback":\n            manager.set_aside_later_than(decision.local.step)\n',
         ""),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",)),
    # issue 33: resume decides before it touches anything (each finding's end-to-end test, and the plan's table)
    Row("a33_every_local_file_damaged_and_an_empty_mirror_start_over", (
        ("    if s.local or s.set_aside:\n        return Plan(\"L2\"", "    if False:\n        return Plan(\"L2\""),
    ), (ACTS + "test_every_local_checkpoint_damaged_is_refused_whatever_the_mirror_and_nothing_is_renamed",
        PLAN_TABLE), path=PLAN),
    Row("a33_damaged_files_renamed_before_the_decision", (
        ("    while True:\n        decision = resume_plan.plan(situation)\n",
         "    manager.set_aside([f.path for f in situation.local if f.damaged])\n"
         "    while True:\n        decision = resume_plan.plan(situation)\n"),
    ), (ACTS + "test_every_local_checkpoint_damaged_is_refused_whatever_the_mirror_and_nothing_is_renamed",)),
    Row("a33_a_fork_continues_its_parents_run", (
        ("    if os.path.realpath(f.path.parent) != os.path.realpath(s.folder):\n        return _fork(s, f)\n", ""),
    ), (ACTS + "test_a_fork_is_a_new_run_that_leaves_its_parents_files_mirror_and_logs_untouched", PLAN_TABLE),
        path=PLAN),
    Row("a33_a_fork_inherits_its_parents_mirror", (
        ('        inherited.pop("mirror", None)', "        pass"),
    ), (ACTS + "test_a_fork_is_a_new_run_that_leaves_its_parents_files_mirror_and_logs_untouched",)),
    Row("a33_a_fork_writes_into_its_parents_logs", (
        ("    if s.log_dir is None or (f.log_dir", "    if False and (f.log_dir"),
    ), (ACTS + "test_a_fork_is_a_new_run_that_leaves_its_parents_files_mirror_and_logs_untouched", PLAN_TABLE),
        path=PLAN),
    Row("a33_a_fork_uploads_among_its_parents_copies", (
        ("    if s.mirror is not None and s.mirror.copies:", "    if False:"),
    ), (ACTS + "test_a_fork_is_a_new_run_that_leaves_its_parents_files_mirror_and_logs_untouched", PLAN_TABLE),
        path=PLAN),
    Row("a33_the_lineage_not_listed", (
        ("""        print(f"run {run or '(none recorded)'}" + (f", branched from {parent}" if parent else ""))""",
         "        pass"),
    ), (ACTS + "test_a_fork_is_a_new_run_that_leaves_its_parents_files_mirror_and_logs_untouched",),
        path="src/list_checkpoints.py"),
    Row("a33_a_newer_checkpoint_on_another_node_overwritten", (
        ("    newer = [n for n in s.nodes if n.step > step]", "    newer = []"),
    ), (ACTS + "test_a_node_with_a_newer_checkpoint_than_rank_0s_choice_is_named_and_never_overwritten",
        PLAN_TABLE), path=PLAN),
    Row("a33_other_nodes_never_asked", (
        ("    if env.distributed and env.local_rank == 0 and not env.is_main:", "    if False:"),
    ), (ACTS + "test_a_node_with_a_newer_checkpoint_than_rank_0s_choice_is_named_and_never_overwritten",)),
    Row("a33_a_full_disk_during_a_fetch_is_a_crash", (
        ("    except OSError as e:\n        free = shutil.disk_usage",
         "    except ZeroDivisionError as e:\n        free = shutil.disk_usage"),
    ), (ACTS + "test_a_full_disk_while_fetching_is_one_line_and_falls_back_to_the_local_checkpoint",)),
    Row("a33_a_mirror_copy_read_from_a_name_a_later_save_took", (
        ('                result["held"] = self.manager.held.hold(self.manager.lasting_name(result["names"]))',
         "                pass"),
    ), (ACTS + "test_each_mirror_copy_holds_the_step_it_is_labelled_with",)),
    Row("a33_what_the_mirror_held_at_the_start_forgotten", (
        ("            mirror.resumed(point.step, point.mirror_holds, known=point.mirror_seen)", "            pass"),
    ), (ACTS + "test_after_a_resume_a_failing_mirror_is_said_to_hold_the_runs_earlier_copies",)),
    Row("a33_the_mirror_lookup_takes_run_id_for_the_local_checkpoints_run", (
        ("    run = valid.run if valid else", "    run = s.run_id if valid else"),
    ), (ACTS + "test_resume_takes_the_mirrors_newer_copy_of_the_local_checkpoints_own_run", PLAN_TABLE), path=PLAN),
    Row("a33_a_launch_behind_the_mirror_uploads_over_its_newer_copies", (
        ("and holds > self._start_step and self.off is None:", "and False:"),
    ), (MIRROR_UNIT + "test_a_launch_that_resumed_older_than_the_mirrors_newest_copy_of_its_run_uploads_nothing",),
        path="src/mirror_upload.py"),
    Row("a33_set_aside_files_given_up_while_no_valid_checkpoint_exists", (
        ("        if aside and latest.exists():", "        if aside:"),
    ), (ASYNC + "test_files_set_aside_are_never_given_up_for_space_while_no_valid_checkpoint_exists",)),
    Row("a33_a_rollback_told_as_lost_work", (
        ('    if point is not None and point.lineage == "rollback" and last_logged_step > step:', "    if False:"),
    ), (MIRROR + "test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints",)),
    Row("a30_a_resume_verifies_only_until_the_first_valid_name", (
        ('            wanted = verify == "all" or (verify == "first" and not any(f.valid for f in files))',
         "            wanted = not any(f.valid for f in files)"),
    ), (ACTS + "test_after_a_resume_every_name_a_later_resume_could_pick_verifies",)),
    # issue 30: the campaign's invariants, each caught by the suite's campaign (its seeds and its hand-written
    # schedule) under that check's name
    Row("a30_campaign_losses_that_differ_from_the_reference", (
        ('    torch.set_rng_state(state["torch"])\n', ""),  # dropout's generator not restored on resume
    ), (CHAOS,), expect=reported("losses")),
    Row("a30_campaign_a_resume_that_takes_a_new_identity", (
        ("run_id=decision.run if continuing else uuid.uuid4().hex[:12],", "run_id=uuid.uuid4().hex[:12],"),
    ), (CHAOS,), expect=reported("identity")),
    Row("a30_campaign_a_wrong_count_of_lost_steps", (
        ("        lost = max(0, last_logged_step - step)", "        lost = max(0, last_logged_step - step - 1)"),
    ), (CHAOS,), expect=reported("lost_line")),
    Row("a30_campaign_a_name_that_does_not_verify", (
        ('            wanted = verify == "all" or (verify == "first" and not any(f.valid for f in files))',
         "            wanted = not any(f.valid for f in files)"),
    ), (CHAOS,), expect=reported("verify")),
    Row("a30_campaign_a_credential_shown", (
        ("    clean = split_userinfo(url)[0]\n", "    clean = url\n"),
    ), (CHAOS,), path="src/mirror_messages.py", expect=reported("secrets")),
    Row("a30_campaign_a_wrong_exit_code", (
        ("exit_code = 3 if diverged else 5 if logs_error else 4 if unsaved_steps or unsaved_stop else 0",
         "exit_code = 3 if diverged else 5 if logs_error else 1 if unsaved_steps or unsaved_stop else 0"),
    ), (CHAOS,), expect=reported("exit_code")),
    Row("a30_campaign_a_fork_into_its_parents_logs", (
        ("    if s.log_dir is None or (f.log_dir", "    if False and (f.log_dir"),
    ), (CHAOS,), path=PLAN, expect=reported("fork_isolation")),
    Row("a30_campaign_a_fork_onto_its_parents_mirror", (
        ("    if s.mirror is not None and s.mirror.copies:", "    if False:"),
    ), (CHAOS,), path=PLAN, expect=reported("fork_isolation")),
    Row("a33_a_failing_rename_while_acting_is_a_crash", (
        ("    except OSError as e:\n        raise UserError(f\"cannot set the damaged",
         "    except ZeroDivisionError as e:\n        raise UserError(f\"cannot set the damaged"),
    ), (ACTS + "test_a_folder_that_refuses_the_set_aside_is_one_line",)),
    # issue 31: bounds that hold and words that are true
    Row("a31_a_stuck_write_waited_for_past_the_unsaved_limit", (
        ("""        return max(0.0, min(self.max_save_seconds - in_flight[1],
                            self.watch.seconds_left(self.policy.interval_seconds)))""",
         "        return max(0.0, self.max_save_seconds - in_flight[1])"),
    ), (ASYNC + "test_a_stuck_write_is_waited_for_within_the_unsaved_limit_and_said_and_the_run_exits_naming_the_"
                "unsaved_steps",)),
    Row("a31_a_silent_wait_for_a_stuck_write", (
        ("            if not quiet:\n                log.warning(\"waiting for the write",
         "            if False:\n                log.warning(\"waiting for the write"),
    ), (ASYNC + "test_a_stuck_write_is_waited_for_within_the_unsaved_limit_and_said_and_the_run_exits_naming_the_"
                "unsaved_steps",)),
    Row("a31_a_best_save_waits_for_a_stuck_write", (
        ('            if set(reasons) <= {"best val", "epoch end"} and', "            if False and"),
    ), (ASYNC + "test_a_best_or_epoch_save_does_not_wait_for_a_stuck_write",)),
    Row("a31_max_unsaved_minutes_read_as_seconds", (
        ("            return self.limit_minutes * 60", "            return self.limit_minutes"),
    ), (ASYNC + "test_max_unsaved_minutes_are_minutes",)),
    Row("a31_a_closed_console_floods_stderr", (
        ("        if not isinstance(error, OSError):\n            return super().handleError(record)",
         "        if True:\n            return super().handleError(record)"),
    ), (BOUNDS + "test_a_console_nobody_reads_is_one_note_in_train_log_not_a_flood_on_stderr",)),
    Row("a31_the_redactor_cuts_at_the_first_at_sign", (
        ('    for at in reversed([i for i, c in enumerate(rest) if c == "@"]):',
         '    for at in [i for i, c in enumerate(rest) if c == "@"][:1]:'),
    ), (BOUNDS + "test_no_form_of_a_secret_in_a_url_is_ever_shown",
        MIRROR + "test_credentials_in_the_mirror_url_never_reach_a_log_line"), path="src/mirror_messages.py"),
    Row("a31_a_reused_pid_is_a_live_lock_holder", (
        ("            return recorded == process_identity(pid)", "            pass"),
    ), (BOUNDS + "test_a_reused_hostname_and_pid_is_not_a_live_lock_holder",)),
    Row("a31_rank_0s_start_up_error_not_broadcast", (
        ("        box = [(result, None if error is None else str(error))]", "        box = [(result, None)]"),
    ), (BOUNDS + "test_a_start_up_error_found_on_rank_0_is_one_line_under_two_processes",)),
    Row("a31_the_mirrors_own_error_text_not_redacted", (
        ("        cause = self.redact(one_line(e))", "        cause = one_line(e)"),
    ), (BOUNDS + "test_the_mirrors_own_error_text_is_redacted",), path="src/mirror_store.py"),
    Row("a31_a_missing_data_dir_found_after_the_log_opened", (
        ('        broadcast_from_main(env, lambda: find_shards(cfg.data_dir, "train"))  # so is a --data_dir without '
         'shards\n', ""),
    ), (BOUNDS + "test_a_bad_input_is_one_line_and_nothing_is_written",)),
    Row("a31_a_usage_error_prints_the_whole_usage", (
        ('        self.exit(2, f"error: {message} (python src/train_improved.py --help lists every flag)\\n")',
         "        super().error(message)"),
    ), (BOUNDS + "test_a_bad_input_is_one_line_and_nothing_is_written",)),
    Row("a31_batch_size_auto_gives_no_reason", (
        ('        log.info("batch_size auto: %d sequences per micro-step on CPU%s", chosen, why)',
         '        log.info("batch_size auto: %d sequences per micro-step on CPU", chosen)'),
    ), (BOUNDS + "test_batch_size_auto_says_why_it_took_less_than_16_on_cpu",)),
    Row("a31_a_resume_from_the_mirror_brings_back_no_best_model", (
        ("        self._own_copies(latest, own, step)\n        return latest", "        return latest"),
    ), (BOUNDS + "test_a_resume_from_the_mirror_brings_back_every_name_the_copy_held",)),
]


def copy_repository(dst: Path) -> None:
    """Copy the tracked and the untracked-but-not-ignored files (the working tree as git sees it) into dst."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the working tree is listed too
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def apply(row: Row, repo: Path) -> str | None:
    """Apply the row's edits to the copy; the reason it cannot be applied, or None. An edit with a third element
    applies to that file instead of the row's path (a promise kept by two modules together)."""
    texts: dict[str, str] = {}
    for old, new, *where in row.edits:
        name = where[0] if where else row.path
        text = texts.get(name) or (repo / name).read_text()
        count = text.count(old)
        if count != 1:
            first_line = old.strip().splitlines()[0]
            return f"snippet not found exactly once ({count} times) in {name}: {first_line!r}"
        texts[name] = text.replace(old, new)
    for name, text in texts.items():
        (repo / name).write_text(text)
    return None


def run_tests(repo: Path, tests: tuple[str, ...]) -> tuple[str, str, str]:
    """Run the tests in the copy: (verdict, detail, pytest's output) with verdict caught, SURVIVED, SKIPPED or
    BROKEN."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    shared_tokenizer = ROOT.parent / "shared" / "tiktoken_cache"  # tests/conftest.py finds it from the checkout
    if "TIKTOKEN_CACHE_DIR" not in env and shared_tokenizer.is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(shared_tokenizer)
    # one process (-o addopts: not the suite's xdist workers, whose early stop exits 2 like a collection error)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-o", "addopts=-ra", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return "BROKEN", f"timed out after {TIMEOUT_SECONDS} s", ""
    out = result.stdout + result.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.MULTILINE)
    if result.returncode == 1:
        return "caught", f"by {failed[0].split('::', 1)[-1]}" if failed else "", out
    if result.returncode == 0:
        skipped = re.search(r"\d+ skipped", out)
        return ("SKIPPED", "some tests were skipped", out) if skipped else ("SURVIVED", "", out)
    tail = "\n".join(out.strip().splitlines()[-15:])
    return "BROKEN", f"pytest exited {result.returncode}:\n{tail}", out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this row (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the rows' names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(row.name for row in ROWS))
        return 0
    rows = [row for row in ROWS if not args.only or row.name in args.only]
    unknown = set(args.only or []) - {row.name for row in ROWS}
    if unknown:
        parser.error(f"no row named {', '.join(sorted(unknown))}; see --list")

    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        snapshot = Path(tmp) / "snapshot"  # one copy of the working tree, so every row mutates the same code
        copy_repository(snapshot)
        all_tests = tuple(dict.fromkeys(t for row in rows for t in row.tests))
        t0 = time.monotonic()
        baseline = Path(tmp) / "baseline"
        shutil.copytree(snapshot, baseline)
        verdict, detail, out = run_tests(baseline, all_tests)
        passed = verdict == "SURVIVED"
        print(f"{'pass' if passed else verdict:9s} {f'baseline: {len(all_tests)} tests on unmodified code':60s} "
              f"{time.monotonic() - t0:6.1f} s", flush=True)
        if not passed:
            print("\n".join(out.strip().splitlines()[-40:]))
            print("the tests must pass on unmodified code first: else every mutation looks caught")
            return 1
        bad = 0
        for row in rows:
            t0 = time.monotonic()
            repo = Path(tmp) / row.name
            shutil.copytree(snapshot, repo)
            problem = apply(row, repo)
            verdict, detail, out = ("STALE", problem, "") if problem else run_tests(repo, row.tests)
            if verdict == "caught" and row.expect and not re.search(row.expect, out):
                verdict, detail = "ELSEWHERE", f"no {row.expect!r} in the output:\n" + "\n".join(
                    out.strip().splitlines()[-25:])
            bad += verdict != "caught"
            print(f"{verdict:9s} {row.name:60s} {time.monotonic() - t0:6.1f} s  {detail}".rstrip(), flush=True)
            shutil.rmtree(repo, ignore_errors=True)
    print(f"{len(rows) - bad} of {len(rows)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
