"""The Java pieces of the COCO caption protocol: Stanford PTBTokenizer and METEOR 1.5, as shipped in pycocoevalcap.

Each call owns one subprocess for its whole life (start, write, read, timeout, stderr kept, always ended), so
a Java that is missing, hangs or dies costs a note, never a hung evaluation. pycocoevalcap's own Meteor class is
not used: it can hang after an error, parses numbers in the system locale and never reads its stderr.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

from utils.errors import UserInputError

logger = logging.getLogger(__name__)

_PACKAGE = Path(__import__("pycocoevalcap").__path__[0])
PTB_JAR = _PACKAGE / "tokenizer" / "stanford-corenlp-3.4.1.jar"
METEOR_JAR = _PACKAGE / "meteor" / "meteor-1.5.jar"
INSTALL_JAVA = "apt-get install default-jre-headless"
TOKENIZERS = ("auto", "ptb", "simple")
# Numbers read in the JVM's locale would be "0,5" in much of Europe; METEOR parses its own output back.
LOCALE_FLAGS = ("-Duser.language=en", "-Duser.country=US", "-Dfile.encoding=UTF-8")
_PUNCTUATION_TOKENS = frozenset(PUNCTUATIONS)
STDERR_KEPT = 4000  # characters of a failed process's stderr named in the error
# METEOR's time limit: its start (the paraphrase table, 10-30 s on two busy cores) plus 20 ms per segment.
METEOR_TIMEOUT_S = 180

# METEOR 1.5's "-l en" parameters (its startup banner: Parameters 0.85 0.2 0.6 0.75; Weights 1.0 0.6 0.8 0.6
# for the exact, stem, synonym and paraphrase stages), used to aggregate its statistics in Python.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.2, 0.6, 0.75
METEOR_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])
METEOR_STATS = 23  # numbers per segment in METEOR's SCORE answer (MeteorStats.toString)


class JavaError(RuntimeError):
    """A Java scorer could not run or gave no usable answer; the message says what happened."""


# ---------------------------------------------------------------------------
# Finding Java
# ---------------------------------------------------------------------------


def find_java(java: str | None = "java") -> str | None:
    """The java executable: a path, or a name on PATH ("java" also tries $JAVA_HOME/bin/java); None: not found."""
    if java is None:
        return None
    found = shutil.which(java)
    if found is None and java == "java" and os.environ.get("JAVA_HOME"):
        found = shutil.which(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    return found


@functools.lru_cache(maxsize=None)
def check_java(java: str | None = "java") -> str | None:
    """None when `java -version` runs, else why not (one line). Kept per process: asked once per run."""
    if java is None:
        return "Java use is off (--java none)"
    path = find_java(java)
    if path is None:
        return f"no Java executable {java!r} found"
    try:
        done = subprocess.run([path, "-version"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{path} -version failed: {error}"
    if done.returncode != 0:
        return f"{path} -version exited with {done.returncode}: {_tail(done.stderr)}"
    return None


def resolve_caption_tokenizer(setting: str, java: str | None = "java") -> str:
    """"ptb" or "simple" for --caption_tokenizer: auto is ptb when Java runs, else simple with one warning."""
    if setting == "simple":
        return "simple"
    problem = check_java(java)
    if setting == "ptb":
        if problem is not None:
            raise UserInputError(
                f"--caption_tokenizer ptb runs the Stanford PTBTokenizer in Java, but {problem}. Install Java "
                f"(`{INSTALL_JAVA}`), point --java at a java executable, or use --caption_tokenizer simple."
            )
        return "ptb"
    if problem is not None:
        _warn_no_java(problem)
        return "simple"
    return "ptb"


@functools.lru_cache(maxsize=None)
def _warn_no_java(problem: str) -> None:
    logger.warning(
        "--caption_tokenizer auto: %s, so captions are scored with the simple tokenizer and without METEOR; the "
        "numbers are not comparable with published COCO tables. Install Java (`%s`) for the official protocol.",
        problem, INSTALL_JAVA,
    )


def _tail(data: bytes | str, limit: int = STDERR_KEPT) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]


def _single_line(text: str) -> str:
    """Every line break Java's readers know (\\r, \\f, \\v, U+2028...) becomes a space: one caption, one line."""
    return " ".join(text.splitlines())


# ---------------------------------------------------------------------------
# PTBTokenizer
# ---------------------------------------------------------------------------


def ptb_tokenize(texts: list[str], java: str | None = "java", timeout: float | None = None) -> list[str]:
    """pycocoevalcap's PTBTokenizer on every text in one Java process: lowercased PTB tokens, its punctuation removed.

    Same command and post-processing as pycocoevalcap.tokenizer.ptbtokenizer, with UTF-8 stated on both sides and
    line breaks inside a text turned to spaces, so the i-th output line always belongs to the i-th text.
    """
    if not texts:
        return []
    path = find_java(java)
    if path is None:
        raise JavaError(f"PTBTokenizer needs Java: no Java executable {java!r} found")
    timeout = timeout if timeout is not None else 60 + len(texts) / 500
    cmd = [path, "-Xmx1g", *LOCALE_FLAGS, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
           "-preserveLines", "-lowerCase", "-encoding", "utf-8"]
    data = "\n".join(_single_line(t) for t in texts).encode("utf-8", "replace")
    try:
        done = subprocess.run(cmd, input=data, capture_output=True, timeout=timeout)  # kills it on timeout
    except subprocess.TimeoutExpired:
        raise JavaError(f"PTBTokenizer did not finish {len(texts)} captions within {timeout:.0f} s") from None
    except OSError as error:
        raise JavaError(f"PTBTokenizer could not start {path}: {error}") from None
    if done.returncode != 0:
        raise JavaError(f"PTBTokenizer exited with {done.returncode}: {_tail(done.stderr)}")
    lines = done.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) == len(texts) + 1 and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise JavaError(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} captions: {_tail(done.stderr)}")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION_TOKENS) for line in lines]


# ---------------------------------------------------------------------------
# METEOR
# ---------------------------------------------------------------------------


@dataclass
class MeteorResult:
    score: float  # METEOR's corpus score (its EVAL over every segment)
    segment_scores: list[float]  # one per hypothesis
    stats: np.ndarray  # (segments, 23) sufficient statistics, what the score is aggregated from


def meteor_heap() -> str:
    """-Xmx for METEOR: 2G (as pycocoevalcap) when the machine has it free, less on a small one (1G at least:
    the English paraphrase table needs about 700 MB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            available = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable:")) // 1024
    except (OSError, StopIteration, ValueError):
        return "2g"
    return f"{max(1024, min(2048, available // 2))}m"


def clean_meteor_text(text: str) -> str:
    """METEOR's stdio protocol separates fields by ||| and segments by newlines: both go from the text."""
    return " ".join(_single_line(text).replace("|||", "").split())


def compute_meteor(hypotheses: list[str], references: list[list[str]], java: str | None = "java",
                   timeout: float | None = None) -> MeteorResult:
    """METEOR 1.5 (-l en -norm) of each hypothesis against its references, and the corpus score.

    The METEOR process is kept for later calls in this Python process (see start_meteor): its start, loading the
    paraphrase table, is 10-30 s, the scoring of a few thousand captions a second or two. Raises JavaError (with
    what Java wrote to stderr) when Java is missing, fails, or runs past the timeout; the process is then ended.
    """
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("compute_meteor needs one list of references per hypothesis, and at least one hypothesis")
    path = find_java(java)
    if path is None:
        raise JavaError(f"no Java executable {java!r} found")
    timeout = timeout if timeout is not None else METEOR_TIMEOUT_S + len(hypotheses) / 50
    score_lines = ["SCORE ||| " + " ||| ".join([*(clean_meteor_text(r) for r in refs), clean_meteor_text(hyp)])
                   for hyp, refs in zip(hypotheses, references)]
    with _METEOR_LOCK:  # one conversation at a time: the answers are matched to the questions by order
        process = _meteor_process(path)
        process.restart_clock(timeout)
        try:
            process.write(score_lines)
            stats_text = process.read_lines(len(hypotheses))
            stats = np.array([_parse_numbers(line, METEOR_STATS) for line in stats_text])
            process.write(["EVAL ||| " + " ||| ".join(stats_text)])
            scores = [_parse_numbers(line, 1)[0] for line in process.read_lines(len(hypotheses) + 1)]
        except BaseException:  # a failed or interrupted conversation leaves answers out of step: end the process
            _METEOR_PROCESSES.pop(path, None)
            process.close(kill=True)
            raise
    return MeteorResult(score=scores[-1], segment_scores=scores[:-1], stats=stats)


# One METEOR process per java executable, for the life of this Python process (ended at exit, or by stop_meteor).
_METEOR_PROCESSES: dict[str, "_JavaProcess"] = {}
_METEOR_LOCK = threading.RLock()


def _meteor_process(path: str) -> "_JavaProcess":
    """The live METEOR process of this Python process for that java, started if there is none (call under the lock)."""
    process = _METEOR_PROCESSES.get(path)
    if process is not None and process.owner == os.getpid() and process.running():
        return process
    if process is not None and process.owner == os.getpid():
        process.close(kill=True)  # it ended: between calls nobody reads its answers, so nothing is lost
    cmd = [path, f"-Xmx{meteor_heap()}", *LOCALE_FLAGS, "-jar", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
    process = _METEOR_PROCESSES[path] = _JavaProcess(cmd, METEOR_TIMEOUT_S, "METEOR")
    return process


def start_meteor(java: str | None = "java") -> None:
    """Start METEOR now, without waiting, so its 10-30 s start overlaps other work (imports, loading a model,
    captioning); the next compute_meteor uses it. Nothing happens when Java does not run. A job that will score
    captions calls this as early as it knows; the process holds about 1 GB until the job ends."""
    if java is None or check_java(java) is not None:
        return
    with _METEOR_LOCK:
        _meteor_process(find_java(java))


@atexit.register
def stop_meteor() -> None:
    """End this process's METEOR processes (at exit; tests call it to start clean)."""
    with _METEOR_LOCK:
        for path in list(_METEOR_PROCESSES):
            process = _METEOR_PROCESSES.pop(path)
            if process.owner == os.getpid():
                process.close(kill=True)  # idle between scorings, so nothing is lost; waiting for its exit took ~5 s


def _parse_numbers(line: str, count: int) -> list[float]:
    try:
        numbers = [float(x) for x in line.split()]
    except ValueError:
        numbers = []
    if len(numbers) != count:
        raise JavaError(f"METEOR answered {line[:300]!r} where {count} number(s) were expected")
    return numbers


def _complete(stats: np.ndarray) -> np.ndarray:
    """Segments (or sums) whose every word matched, in a single chunk: METEOR gives them no fragmentation."""
    stages = stats[..., 4:20].reshape(*stats.shape[:-1], 4, 4)  # stage x (test content, ref content, test fn, ref fn)
    return (((stages[..., 0] + stages[..., 2]).sum(-1) == stats[..., 0])
            & ((stages[..., 1] + stages[..., 3]).sum(-1) == stats[..., 1]) & (stats[..., 20] == 1))


def meteor_summable(stats: np.ndarray) -> np.ndarray:
    """Per-segment statistics as METEOR's EVAL sums them (MeteorStats.addStats): a complete segment adds no chunk.
    The corpus score is meteor_from_stats of the sum of these rows."""
    stats = np.array(stats, np.float64)
    stats[..., 20] = np.where(_complete(stats), 0.0, stats[..., 20])
    return stats


def meteor_from_stats(stats: np.ndarray) -> np.ndarray:
    """METEOR's score from statistics (..., 23), as MeteorScorer.computeMetrics does it: of one segment, or of a
    corpus from the sum of its meteor_summable rows."""
    stats = np.asarray(stats, np.float64)
    test_len, ref_len, test_fn, ref_fn = (stats[..., i] for i in range(4))
    stages = stats[..., 4:20].reshape(*stats.shape[:-1], 4, 4)
    chunks, test_words, ref_words = stats[..., 20], stats[..., 21], stats[..., 22]
    d = METEOR_DELTA
    with np.errstate(divide="ignore", invalid="ignore"):
        test_weighted = (stages[..., 0] @ METEOR_WEIGHTS) * d + (stages[..., 2] @ METEOR_WEIGHTS) * (1 - d)
        ref_weighted = (stages[..., 1] @ METEOR_WEIGHTS) * d + (stages[..., 3] @ METEOR_WEIGHTS) * (1 - d)
        precision = test_weighted / (d * (test_len - test_fn) + (1 - d) * test_fn)
        recall = ref_weighted / (d * (ref_len - ref_fn) + (1 - d) * ref_fn)
        f_mean = 1.0 / ((1 - METEOR_ALPHA) / precision + METEOR_ALPHA / recall)
        frag = np.where(_complete(stats), 0.0, chunks / ((test_words + ref_words) / 2))
        score = f_mean * (1 - METEOR_GAMMA * frag**METEOR_BETA)
    return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))


class _JavaProcess:
    """One line-based Java subprocess under a deadline: writes from a thread (so neither side's pipe buffer can
    deadlock the other), reads stdout lines through a queue, keeps stderr; close() kills it and waits for it."""

    def __init__(self, cmd: list[str], timeout: float, name: str):
        self.name, self.owner = name, os.getpid()
        self.restart_clock(timeout)
        self.stderr: list[bytes] = []
        self.lines: queue.Queue = queue.Queue()
        try:
            self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as error:
            raise JavaError(f"{name} could not start {cmd[0]}: {error}") from None
        self.threads = [threading.Thread(target=self._drain_stderr, daemon=True),
                        threading.Thread(target=self._read_stdout, daemon=True)]
        for thread in self.threads:
            thread.start()

    def restart_clock(self, timeout: float) -> None:
        """A new deadline, timeout seconds from now, for the next answers."""
        self.timeout, self.deadline = timeout, time.monotonic() + timeout

    def running(self) -> bool:
        return self.process.poll() is None

    def _drain_stderr(self) -> None:
        for chunk in iter(lambda: self.process.stderr.read(4096), b""):
            self.stderr.append(chunk)
            del self.stderr[:-8]  # the end is what names the failure

    def _read_stdout(self) -> None:
        for line in iter(self.process.stdout.readline, b""):
            self.lines.put(line.decode("utf-8", "replace").rstrip("\r\n"))
        self.lines.put(None)  # end of output: the process ended or closed stdout

    def _write_all(self, data: bytes) -> None:
        try:
            self.process.stdin.write(data)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the reader sees the end of output and reports it with stderr

    def write(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8", "replace")
        threading.Thread(target=self._write_all, args=(data,), daemon=True).start()

    def read_lines(self, count: int) -> list[str]:
        out = []
        while len(out) < count:
            remaining = self.deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.0, remaining))
            except queue.Empty:
                raise JavaError(f"{self.name} gave no answer within {self.timeout:.0f} s "
                                f"({len(out)} of {count} lines read); stopped it") from None
            if line is None:
                code = self.process.wait(timeout=5)
                time.sleep(0.1)  # let the stderr thread take the last words
                raise JavaError(f"{self.name} ended (exit code {code}) after {len(out)} of {count} answer lines: "
                                f"{_tail(b''.join(self.stderr)) or 'nothing on stderr'}")
            out.append(line)
        return out

    def close(self, kill: bool = False) -> None:
        """End the process: stdin closed, so it exits; killed when it failed or does not exit within 5 s."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=0 if kill else 5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for thread in self.threads:
            thread.join(timeout=2)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
