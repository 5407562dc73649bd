"""Video output: frames to uint8 as the official `save_video` does, and an MP4 writer that
never leaves a broken file at the destination.

`save_video` writes to a hidden temporary name beside the destination, then checks the
finished file (non-empty, and ffmpeg decodes exactly the frames written) before renaming it.
imageio's ffmpeg writer does not report ffmpeg's exit status, so a failure while ffmpeg
writes the trailer ("No space left on device") would otherwise pass as a saved video.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import torch

from .requests import InputError

HINT = "pip install imageio imageio-ffmpeg"


VIDEO_SUFFIX = ".mp4"  # the writer makes H.264 MP4 files only


class VideoWriterError(InputError):
    """The MP4 cannot be written (imageio or ffmpeg missing, disk full, unwritable path)."""


class OutputWriteError(VideoWriterError):
    """Writing an output failed while it was written (disk full, ffmpeg died, permissions changed
    meanwhile): an I/O failure rather than bad input (the CLIs exit with code 3, not 2)."""


def check_video_suffix(path) -> Path:
    """InputError unless `path` ends in .mp4 (the only container the writer makes)."""
    path = Path(path)
    if path.suffix.lower() != VIDEO_SUFFIX:
        got = f"{path.suffix!r}" if path.suffix else "no extension"
        raise InputError(f"cannot write {path}: videos are written as MP4 only, got {got}; use a name ending "
                         f"in {VIDEO_SUFFIX}")
    return path


def check_video_tensor(video) -> None:
    """InputError unless `video` is a [3, F, H, W] tensor of finite values (NaN or inf would be
    written as black frames)."""
    if not isinstance(video, torch.Tensor):
        raise InputError(f"save_video needs a torch.Tensor [3, F, H, W], got {type(video).__name__}")
    if video.dim() != 4 or video.shape[0] != 3:
        hint = " (one frame? add the frame axis: video.unsqueeze(1))" if video.dim() == 3 and video.shape[0] == 3 \
            else ""
        raise InputError(f"save_video needs a [3, F, H, W] video tensor (channels, frames, height, width), "
                         f"got shape {list(video.shape)}{hint}")
    bad = int((~torch.isfinite(video)).sum()) if video.is_floating_point() else 0
    if bad:
        raise InputError(f"the video holds {bad} non-finite values (NaN or inf) out of {video.numel()}: "
                         "nothing written (a bad input number, e.g. the guidance scale, or a numerical failure)")


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8, exactly as the official save_video:
    u8 = trunc(255 * (clamp(x, -1, 1) + 1) / 2)."""
    x = video.detach().float().clamp(-1, 1)
    x = (x + 1) / 2
    return (x * 255).to(torch.uint8).permute(1, 2, 3, 0).cpu()


def check_video_writer() -> None:
    """Raise VideoWriterError (one line) unless imageio can write MP4 here. The CLIs call this
    before loading any model, so a long generation never ends without its file."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg
    except ImportError as err:
        raise VideoWriterError(f"writing MP4 needs imageio and imageio-ffmpeg ({err.name or err} is missing; "
                               f"{HINT})") from None
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except (RuntimeError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoWriterError(f"writing MP4 needs an ffmpeg binary: {first} ({HINT}, or set "
                               f"IMAGEIO_FFMPEG_EXE)") from None
    why = _ffmpeg_runs(exe)
    if why:
        raise VideoWriterError(f"writing MP4 needs a working ffmpeg binary: {exe} -version {why} ({HINT}, or point "
                               f"IMAGEIO_FFMPEG_EXE at a working ffmpeg)")


def _ffmpeg_runs(exe: str, timeout: float = 60.0) -> str:
    """'' when `exe -version` runs and exits 0 within `timeout` seconds (imageio takes the binary
    named by IMAGEIO_FFMPEG_EXE untested), else what went wrong. The timeout is there for a binary that
    hangs; it is generous because a false refusal costs a run: 15 s was once not enough for the
    static ffmpeg's first start on a 2-core machine running two test suites."""
    try:
        out = subprocess.run([exe, "-version"], capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"did not answer within {timeout:g} s"
    except OSError as err:
        return f"cannot run: {err.strerror or err}"
    if out.returncode != 0:
        return f"exited with code {out.returncode}"
    return ""


def check_output_path(path) -> Path:
    """Raise InputError (one line) unless a file can be created at `path`: it is not a directory,
    and its nearest existing ancestor is a writable directory. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path is a directory: {path}")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"cannot create {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {path}: no write permission in {parent}")
    return path


def _ffmpeg_reason(text: str) -> str:
    """The first error line of an ffmpeg log, without its '[ctx @ 0x...]' prefix."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"error|invalid|not found|no space", ln, re.IGNORECASE) and "configuration:" not in ln:
            return re.sub(r"^\[[^\]]*\]\s*", "", ln)
    return lines[-1] if lines else "ffmpeg failed"


def check_mp4(path, frames: int) -> None:
    """Raise VideoWriterError unless `path` is a non-empty MP4 that ffmpeg decodes to `frames` frames."""
    import imageio_ffmpeg

    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        raise VideoWriterError("ffmpeg wrote an empty file")
    try:
        got, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except RuntimeError as err:
        raise VideoWriterError(f"the finished MP4 does not decode ({_ffmpeg_reason(str(err))})") from None
    if got != frames:
        raise VideoWriterError(f"the finished MP4 holds {got} of {frames} frames")


def _disk_hint(folder: Path, need: int) -> str:
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"; only {free / 2**20:.1f} MiB free in {folder}" if free < max(need, 1 << 20) else ""


def save_video(video: torch.Tensor, path, fps: int = 16) -> Path:
    """Write an MP4 (libx264, yuv420p, imageio quality 8, as the official code) to a temporary
    name, check it decodes to every frame, then rename it. On any failure nothing is left at
    `path` (nor the temporary file) and one line says why: InputError for a tensor that is not
    [3, F, H, W] of finite values or a name not ending in .mp4, VideoWriterError when imageio or
    ffmpeg is missing, OutputWriteError when the write itself fails (disk full, ...)."""
    check_video_tensor(video)
    check_video_suffix(path)
    check_video_writer()
    import imageio

    path = check_output_path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix or '.mp4'}")
    frames = video_to_uint8(video).numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # ffmpeg's own log is silenced: its errors are found by check_mp4 and reported in one line
        with imageio.get_writer(str(tmp), fps=fps, codec="libx264", quality=8, format="FFMPEG",
                                ffmpeg_log_level="quiet") as wr:
            for f in frames:
                wr.append_data(f)
        check_mp4(tmp, len(frames))
        tmp.replace(path)
    except OSError as err:  # disk full, permissions changed meanwhile, ffmpeg's pipe closed, ...
        text = str(err).strip()
        reason = err.strerror or (text.splitlines()[0] if text else type(err).__name__)
        raise OutputWriteError(f"cannot write {path}: {reason}") from None
    except VideoWriterError as err:
        raise OutputWriteError(f"cannot write {path}: {err}{_disk_hint(path.parent, frames.nbytes // 50)}") \
            from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
