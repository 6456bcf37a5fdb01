"""The `dicom-watcher` command line: parses, configures logging, maps errors
to exit statuses. The work is done by the library modules below it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from watcher import __version__, headers, logs, placement
from watcher.config import config_file, load_config, parse_listen
from watcher.engine import POOL_THRESHOLD, Sorter, header_pool, iter_files
from watcher.errors import NotRoutable, WatcherError
from watcher.priority import yield_to_receiver
from watcher.rules import Lab, Rule, RuleSet, describe_claim, load_rules, single_rule
from watcher.stopping import stop_on_signals

log = logging.getLogger("watcher.cli")

#: The layout `sort --dest` uses when no --path is given.
DEFAULT_SORT_TEMPLATE = (
    "{PatientID}/{StudyDate}_{StudyDescription}/"
    "{SeriesNumber:03d}_{SeriesDescription|ProtocolName}/{InstanceNumber:05d}.dcm"
)
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(level=args.log_level, log_format=args.log_format, log_file=args.log_file)
    placement.raise_open_file_limit()
    try:
        return int(args.handler(args))
    except WatcherError as error:
        print(f"dicom-watcher: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The `dicom-watcher` program: `main`, then its exit status.

    When nothing else runs any more (no thread, all output flushed), the
    process ends without the interpreter tearing down every module, which
    takes longer than `sort` or `run --once` on a small inbox needs for its
    work; otherwise it exits the usual way, and waits for what still runs.
    """
    code = main(argv)
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # (a closed pipe): the usual exit reports it
        sys.exit(code)
    if threading.active_count() == 1:
        os._exit(code)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-watcher",
        description="Route DICOM files from a Storage SCP's inbox into lab trees.",
    )
    parser.add_argument("--version", action="version", version=f"dicom-watcher {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    common.add_argument("--log-format", default="kv", choices=["kv", "json"])
    common.add_argument("--log-file", help="also append log lines to this file (logrotate-safe)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sort = commands.add_parser(
        "sort", parents=[common], help="sort existing files into lab trees (one shot)"
    )
    sort.add_argument("sources", nargs="+", metavar="SRC", help="files or folders to sort")
    target = sort.add_mutually_exclusive_group(required=True)
    target.add_argument("--rules", metavar="DIR", help="route by the rule files in DIR")
    target.add_argument("--dest", metavar="DIR", help="put every instance under DIR")
    sort.add_argument(
        "--path",
        metavar="TEMPLATE",
        help=f"path template with --dest (default: {DEFAULT_SORT_TEMPLATE})",
    )
    sort.add_argument("--subject", metavar="ID", help="only instances with this PatientID")
    sort.add_argument(
        "--move", action="store_true", help="remove each source once its copies are durable"
    )
    sort.add_argument("--dry-run", action="store_true", help="show targets, write nothing")
    sort.set_defaults(handler=cmd_sort)

    preview = commands.add_parser(
        "preview", parents=[common], help="show what run would do with these files; writes nothing"
    )
    preview.add_argument("sources", nargs="+", metavar="SRC")
    preview.add_argument(
        "--rules", metavar="DIR", help="rules folder (default: the config's, else ./rules)"
    )
    preview.add_argument(
        "--config", metavar="FILE", help="the config's rules folder and its labs and claims"
    )
    preview.set_defaults(handler=cmd_preview)

    run = commands.add_parser(
        "run", parents=[common], help="the daemon: watch the inbox and place complete studies"
    )
    run.add_argument(
        "--config", metavar="FILE", help="YAML config (default: ./dicom-watcher.yaml if present)"
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="place what is in the inbox now, then exit (0 when drained)",
    )
    run.add_argument("--quiet-seconds", type=float, metavar="N", help="override quiet_seconds")
    run.set_defaults(handler=cmd_run)

    hooks = commands.add_parser(
        "hooks",
        parents=[common],
        help="run one lab's hook jobs, as that lab's hook_user (never root or the service user)",
    )
    hooks.add_argument("--lab", required=True, metavar="NAME", help="the lab (a key of labs:)")
    hooks.add_argument(
        "--config", metavar="FILE", help="YAML config (default: ./dicom-watcher.yaml if present)"
    )
    hooks.add_argument(
        "--once", action="store_true", help="run what is waiting (and its retries), then exit"
    )
    hooks.set_defaults(handler=cmd_hooks)

    status = commands.add_parser("status", parents=[common], help="what the daemon is doing")
    status.add_argument("--config", metavar="FILE")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=cmd_status)

    web = commands.add_parser(
        "web", parents=[common], help="serve the read-only status page and /metrics"
    )
    web.add_argument("--config", metavar="FILE")
    web.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to serve on (default: the config's web_listen)",
    )
    web.set_defaults(handler=cmd_web)

    check = commands.add_parser("check", parents=[common], help="validate rule files")
    check.add_argument(
        "--rules", metavar="DIR", help="rules folder (default: the config's, else ./rules)"
    )
    check.add_argument("--config", metavar="FILE", help="the config's rules folder and its labs")
    check.add_argument(
        "sources",
        nargs="*",
        metavar="SRC",
        help="sample files: show, per lab, which rules and claims take them",
    )
    check.set_defaults(handler=cmd_check)
    return parser


# --- run and status ----------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from watcher.daemon import Daemon  # with watchdog: imported only to run

    config = load_config(args.config).with_overrides(quiet_seconds=args.quiet_seconds)
    stop = stop_on_signals()
    if not args.once:  # before any thread or placer starts: they inherit it
        log.info(logs.kv("priority", yields_to_receiver=yield_to_receiver()))
    return Daemon(
        config,
        once=args.once,
        stop=stop,
        quiet_override=args.quiet_seconds,
        config_file=config_file(args.config),
    ).run()


def cmd_hooks(args: argparse.Namespace) -> int:
    from watcher.labrunner import run_lab_hooks

    config = load_config(args.config)
    return run_lab_hooks(config, args.lab, once=args.once, stop=stop_on_signals())


def cmd_web(args: argparse.Namespace) -> int:
    from watcher import web  # (http.server: imported only to serve)

    config = load_config(args.config, resolve=False)  # (never touches a lab's share)
    listen = parse_listen(args.listen or config.web_listen, "--listen")
    try:
        return web.serve(config, listen, stop_on_signals())
    except OSError as error:
        raise WatcherError(f"cannot listen on {listen[0]}:{listen[1]}: {error.strerror}") from None


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config, resolve=False)  # (never touches a lab's share)
    path = config.state / "status.json"
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WatcherError(
            f"no status in {path}: the daemon has not run with this config"
        ) from None
    except (OSError, ValueError) as error:
        raise WatcherError(f"cannot read {path}: {error}") from error
    age = time.time() - float(status.get("updated", 0))
    status["running"] = _alive(int(status.get("pid", 0))) and age < 60
    status["updated_seconds_ago"] = round(age, 1)
    if args.json:
        print(json.dumps(status, indent=1))
        return EXIT_OK
    state = "running" if status["running"] else "NOT RUNNING"
    print(
        f"dicom-watcher {state} (pid {status.get('pid')}, updated {age:.0f} s ago), "
        f"inbox {status.get('inbox')}"
    )
    print(
        f"files arriving: {status.get('files_arriving', 0)}   pending studies: "
        f"{len(status.get('studies', []))}   quarantine: {status.get('quarantine_files', 0)}   "
        f"unmatched: {status.get('unmatched_files', 0)}   placed: "
        f"{status.get('placed_studies', 0)} studies / {status.get('placed_files', 0)} files"
    )
    for study in status.get("studies", []):
        line = (
            f"  {study['study']}  patient={study['patient']!r} files={study['files']} "
            f"age={study['age_seconds']:.0f}s  {study['next']}"
        )
        if study.get("last_error"):
            line += f"  last error: {study['last_error']} (attempts {study['attempts']})"
        print(line)
    for held in status.get("quarantine_failed", []):
        print(
            f"  {held['path']}  not quarantined ({held['reason']}): {held['error']} "
            f"(attempts {held['attempts']}, next try in {held['next_try_in']} s)"
        )
    for destination in status.get("destinations", []):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(destination["since"])))
        line = f"destination {destination['destination']}: {destination['state']} since {since}"
        if destination.get("reason"):
            line += f" ({destination['reason']})"
        print(line)
    hooks = status.get("hooks") or {}
    operator = hooks.get("operator") or {}
    if any(operator.values()):
        print(
            f"hooks (operator's, in the daemon): waiting {operator.get('waiting', 0)}, "
            f"running {operator.get('running', 0)}, kept failed {operator.get('failed', 0)}"
        )
    for lab, jobs in (hooks.get("labs") or {}).items():
        seen = jobs.get("runner_seen")
        runner = jobs.get("runner")
        if seen:
            runner = f"{runner}, seen {time.time() - float(seen):.0f} s ago"
        line = (
            f"hooks of lab {lab}: waiting {jobs['waiting']}, running {jobs['running']}, "
            f"failed {jobs['failed']}; runner ({jobs.get('hook_user') or 'no hook_user'}): {runner}"
        )
        if jobs.get("problem"):
            line += f"; {jobs['problem']}"
        print(line)
    last = status.get("last_placement") or {}
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last.get("time", 0))))
        print(
            f"last placement: {when} lab={last.get('lab')} study={last.get('study')} "
            f"files={last.get('files')} -> {last.get('destination')}"
        )
    return EXIT_OK


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- check -------------------------------------------------------------------


def rules_and_labs(args: argparse.Namespace) -> tuple[str, dict[str, Lab] | None]:
    """The rules folder and the labs: --rules, else the config's (with its
    `labs:`), else ./rules with no labs."""
    if getattr(args, "config", None) is None:
        return args.rules or "rules", None
    config = load_config(args.config)
    return args.rules or str(config.rules), config.labs


def rules_or_exit(directory: str, labs: dict[str, Lab] | None = None) -> RuleSet:
    """Load rules, printing each problem as `file:line: message`; a folder
    with problems is a usage error for one-shot commands."""
    ruleset = load_rules(directory, labs)
    for line in (*ruleset.warnings, *ruleset.problems):
        print(line, file=sys.stderr)
    if ruleset.problems:
        raise WatcherError(f"{len(ruleset.problems)} problem(s) in the rules in {directory}")
    return ruleset


def cmd_check(args: argparse.Namespace) -> int:
    folder, labs = rules_and_labs(args)
    state = load_config(args.config).state if args.config else None
    ruleset = load_rules(folder, labs)
    for problem in ruleset.problems:
        print(problem)
    for warning in ruleset.warnings:
        print(warning)
    for lab in (labs or {}).values():
        if lab.hook_user and not _account_exists(lab.hook_user):
            print(
                f"{args.config}: warning: labs.{lab.name}.hook_user {lab.hook_user} is no "
                "account on this machine: the lab's hooks wait until it exists and its runner runs"
            )
        elif lab.hook_user:
            shared = _sharing_group(lab.hook_user, service=_owner(state))
            if shared:
                print(
                    f"{args.config}: warning: the group of labs.{lab.name}.hook_user "
                    f"{lab.hook_user} is shared with {', '.join(shared)}: they can read the "
                    "lab's jobs and block its results (give the hook user a group of its own, "
                    "shared with the service user only)"
                )
        if lab.claims == ():
            print(
                f"{args.config}: warning: lab {lab.name} has no claims: its rules take nothing "
                f"(give labs.{lab.name}.claims, or `claims: all`)"
            )
    for rule in ruleset.rules:
        if rule.tenant and rule.hooks:
            hook_user = (labs or {})[rule.tenant].hook_user
            if hook_user:
                print(
                    f"{rule.source}: note: its hooks run as {hook_user} by lab {rule.tenant}'s "
                    f"runner (dicom-watcher hooks --lab {rule.tenant}), not by the daemon"
                )
            else:
                print(
                    f"{rule.source}: warning: its hooks never run: labs.{rule.tenant}.hook_user "
                    "is not set (a lab's hooks run under its own account, by `dicom-watcher "
                    f"hooks --lab {rule.tenant}`; the daemon never runs them)"
                )
        if not rule.destination.is_dir():
            print(
                f"{rule.source}: warning: destination {rule.destination} does not exist now "
                "(it is never created; files wait until it appears)"
            )
    for warning in ruleset.overlaps():
        print(warning)
    for lab in (labs or {}).values():
        print(lab_summary(lab, [rule for rule in ruleset.rules if rule.tenant == lab.name]))
    if args.sources:
        preview(args.sources, ruleset)
    if ruleset.problems:
        print(f"{len(ruleset.problems)} problem(s) in {folder}", file=sys.stderr)
        return EXIT_INCOMPLETE
    print(
        f"ok: {len(ruleset.rules)} rule(s) in {folder}: "
        + ", ".join(rule.name for rule in ruleset.rules)
    )
    return EXIT_OK


def _owner(folder: Path | None) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(folder.stat().st_uid).pw_name if folder else None
    except (OSError, KeyError):
        return None


def _sharing_group(hook_user: str, service: str | None) -> list[str]:
    """Accounts other than `hook_user` and the service user in the hook
    user's own group (through which jobs and results pass)."""
    import grp
    import pwd

    gid = pwd.getpwnam(hook_user).pw_gid
    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:
        return []
    members |= {entry.pw_name for entry in pwd.getpwall() if entry.pw_gid == gid}
    return sorted(members - {hook_user, service, "root"})


def _account_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def lab_summary(lab: Lab, rules: list[Rule]) -> str:
    """`lab smith: takes StudyDescription ~ ^SMITH\\^ | ...; writes under ...; rules ...`"""
    if lab.claims is None:
        takes = "any study (claims: all)"
    elif not lab.claims:
        takes = "nothing (no claims)"
    else:
        takes = " | ".join(map(describe_claim, lab.claims))
    under = ", ".join(map(str, lab.destinations)) or "nowhere (no destinations)"
    names = ", ".join(rule.name for rule in rules) or "none"
    return f"lab {lab.name}: takes {takes}; writes under {under}; rules: {names}"


# --- sort --------------------------------------------------------------------


def cmd_sort(args: argparse.Namespace) -> int:
    if args.dest is not None:
        if not Path(args.dest).is_dir():
            raise WatcherError(
                f"--dest {args.dest} is not an existing folder (it is never created)"
            )
        ruleset = single_rule(args.dest, args.path or DEFAULT_SORT_TEMPLATE)
    else:
        if args.path:
            raise WatcherError("--path goes with --dest; with --rules each rule has its own path")
        ruleset = rules_or_exit(args.rules)
    sorter = Sorter(ruleset, subject=args.subject, move=args.move, dry_run=args.dry_run)
    files = list(iter_files(args.sources))
    progress = Progress(len(files))
    pool = header_pool(threads_running=False) if len(files) >= POOL_THRESHOLD else None
    try:
        sorter.sort_files(files, pool, progress.step)
    finally:
        if pool is not None:
            pool.shutdown()
    progress.done()
    prefix = "dry run (nothing written): " if args.dry_run else ""
    for line in sorter.summary.lines():
        print(prefix + line)
        prefix = ""
    return EXIT_OK if sorter.summary.complete else EXIT_INCOMPLETE


class Progress:
    """A one-line progress bar on stderr, shown only on a terminal."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.count = 0
        self.stream = stream or sys.stderr
        self.enabled = total > 0 and getattr(self.stream, "isatty", lambda: False)()
        self.started = self.shown = time.monotonic()

    def step(self, files: int = 1) -> None:
        self.count += files
        now = time.monotonic()
        if self.enabled and (now - self.shown > 0.2 or self.count == self.total):
            self.shown = now
            width = 30
            filled = width * self.count // self.total
            rate = self.count / max(now - self.started, 1e-6)
            bar = "#" * filled + "." * (width - filled)
            print(
                f"\r[{bar}] {self.count}/{self.total} files {rate:.0f}/s", end="", file=self.stream
            )

    def done(self) -> None:
        if self.enabled:
            print(file=self.stream)


# --- preview -----------------------------------------------------------------


def cmd_preview(args: argparse.Namespace) -> int:
    folder, labs = rules_and_labs(args)
    ruleset = rules_or_exit(folder, labs)
    return preview(args.sources, ruleset)


def preview(sources: Sequence[str], ruleset: RuleSet) -> int:
    """Print, per study, what each lab's and the operator's rules would do."""
    tags = headers.tags_for(ruleset.fields)
    studies: dict[str, list[headers.Instance]] = defaultdict(list)
    not_routable: list[tuple[str, str]] = []
    for path in iter_files(sources):
        try:
            instance = headers.read_instance(path, tags)
        except NotRoutable as error:
            not_routable.append((path, error.reason))
            continue
        except OSError as error:
            not_routable.append((path, f"cannot read: {error.strerror}"))
            continue
        studies[instance.study_instance_uid].append(instance)
    for study_uid, instances in studies.items():
        print_study_preview(study_uid, instances, ruleset)
    for path, reason in not_routable:
        print(f"not routable: {path}: {reason}")
    print(
        f"{len(studies)} stud(ies), {sum(map(len, studies.values()))} instance(s), "
        f"{len(not_routable)} not routable"
    )
    return EXIT_OK if studies else EXIT_INCOMPLETE  # (nothing to preview: a mistyped path?)


class RuleTally:
    """What one rule did with a study's instances, for the preview."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.paths: dict[str, list[str]] = defaultdict(list)  # by series
        self.blocked = 0
        self.passed_over: dict[str, int] = defaultdict(int)  # by the rule that took them

    def lines(self, indent: str) -> list[str]:
        rule, lines = self.rule, []
        taken = sum(map(len, self.paths.values()))
        if taken:
            lines.append(f"{indent}rule {rule.name} -> {rule.destination} ({taken} files)")
            for series, paths in self.paths.items():
                lines.append(f"{indent}  series {series or '?'}: {len(paths)} file(s)")
                lines.extend(f"{indent}    {path}" for path in sorted(paths)[:2])
                if len(paths) > 2:
                    lines.append(f"{indent}    ... and {len(paths) - 2} more")
        for winner, count in self.passed_over.items():
            lines.append(
                f"{indent}rule {rule.name}: matches {count} file(s), not taken: "
                f"exclusive rule {winner} takes them"
            )
        if self.blocked:
            claims = (
                " | ".join(map(describe_claim, rule.claims))
                if rule.claims
                else "it has none: its rules take nothing"
            )
            lines.append(
                f"{indent}rule {rule.name}: matches {self.blocked} file(s), blocked: no claim of "
                f"lab {rule.tenant} holds (claims: {claims})"
            )
        return lines


def print_study_preview(
    study_uid: str, instances: list[headers.Instance], ruleset: RuleSet
) -> None:
    first = instances[0].values
    print(
        f"study {study_uid} patient={first.get('PatientID', '')!r} "
        f"date={first.get('StudyDate', '')} description={first.get('StudyDescription', '')!r} "
        f"files={len(instances)}"
    )
    tallies: dict[str, RuleTally] = {}
    claimed: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    unmatched = 0
    for instance in instances:
        values = instance.values
        series = values.get("SeriesNumber", "") + " " + values.get("SeriesDescription", "")
        decisions = ruleset.explain(values)
        if not any(decision.taken for decision in decisions):
            unmatched += 1
        allowed: dict[str, int] = {}
        for decision in decisions:
            rule = decision.rule
            tally = tallies.setdefault(rule.name, RuleTally(rule))
            if decision.claim is None:
                tally.blocked += 1
                continue
            allowed[rule.tenant] = decision.claim
            if decision.taken:
                tally.paths[series.strip()].append(rule.path.render(values))
            elif decision.taken_by is not None:
                tally.passed_over[decision.taken_by.name] += 1
        for tenant, claim in allowed.items():
            claimed[tenant][claim] += 1
    for tenant in sorted({tally.rule.tenant for tally in tallies.values()}):
        indent = "  "
        if tenant:
            print(f"  lab {tenant}:")
            indent = "    "
            some = next(t.rule for t in tallies.values() if t.rule.tenant == tenant)
            for claim, count in sorted(claimed[tenant].items()):
                held = (
                    "claims: all"
                    if claim < 0
                    else f"claim {claim + 1} ({describe_claim(some.claims[claim])})"  # type: ignore[index]
                )
                print(f"{indent}{held} allows {count} file(s)")
        for tally in tallies.values():
            if tally.rule.tenant == tenant:
                for line in tally.lines(indent):
                    print(line)
    if unmatched:
        print(
            f"  unmatched: {unmatched} file(s) "
            "(no rule takes them; run keeps them in state/unmatched)"
        )
