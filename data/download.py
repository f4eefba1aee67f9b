"""Download RAVDESS archives from Zenodo (record 1188976): resumable, checked against Zenodo's md5, extracted.

Speech audio of all 24 actors is one archive (Audio_Speech_Actors_01-24.zip, ~200 MB of 48 kHz wav); the speech
video comes per actor (Video_Speech_Actor_XX.zip, ~500 MB each: 01- mp4 with sound and 02- mp4 without). An
interrupted download resumes where it stopped (HTTP range request); a finished archive is verified, extracted into
DEST and (unless KEEP_ARCHIVES) deleted; a rerun skips what is done. Then run data/prepare_ravdess.py --root=DEST.
Licence: CC BY-NC-SA 4.0 (Livingstone & Russo 2018, PLoS ONE 13(5): e0196391).

    python data/download.py --dest=~/data/RAVDESS
    python data/download.py --dest=~/data/RAVDESS --video_actors="[1, 2, 3, 4]"
    !python data/download.py --dest=/content/drive/MyDrive/RAVDESS --video_actors="list(range(1, 25))"
"""
import hashlib
import http.client
import json
import os
import sys
import time
import zipfile
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

if __name__ == "__main__":  # run as a file: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from data.ravdess import DataError  # noqa: E402

# What to fetch
DEST = "RAVDESS"                 # folder for the archives and the extracted files
SPEECH_AUDIO = True              # Audio_Speech_Actors_01-24.zip
VIDEO_ACTORS = []                # actors (1-24) whose Video_Speech_Actor_XX.zip to fetch
KEEP_ARCHIVES = False            # keep the .zip files after extraction (doubles the disk space)
# Where from
RECORD_URL = "https://zenodo.org/api/records/1188976"  # Zenodo API record: file names, md5s, download links
TIMEOUT = 60                     # s, per network operation
RETRIES = 3                      # attempts per archive when the connection drops (each resumes)
RETRY_WAIT = 2.0                 # s, times the attempt number, before trying again
CHUNK = 1 << 20                  # bytes per read


def archive_names(speech_audio: bool = True, video_actors: list[int] | int = ()) -> list[str]:
    """Zenodo file names of the chosen archives."""
    video_actors = [video_actors] if isinstance(video_actors, int) else video_actors
    bad = [a for a in video_actors if not 1 <= int(a) <= 24]
    if bad:
        raise DataError(f"video actors must be 1-24, got {bad}")
    names = ["Audio_Speech_Actors_01-24.zip"] if speech_audio else []
    return names + [f"Video_Speech_Actor_{int(a):02d}.zip" for a in sorted(set(video_actors))]


def _offline(url: str, reason: object) -> DataError:
    return DataError(f"cannot reach {url} ({reason}): check the internet connection, or download the archives by "
                     f"hand from https://zenodo.org/records/1188976, extract them and pass that folder to "
                     f"data/prepare_ravdess.py --root=...")


def fetch_record(record_url: str = RECORD_URL, timeout: float = TIMEOUT) -> dict[str, dict]:
    """{file name: {'url', 'md5', 'size'}} of a Zenodo record, from its API JSON."""
    try:
        with urlopen(record_url, timeout=timeout) as response:
            record = json.load(response)
    except HTTPError as e:
        raise DataError(f"Zenodo answered HTTP {e.code} for {record_url}") from None
    except (URLError, OSError) as e:
        raise _offline(record_url, getattr(e, "reason", e)) from None
    except ValueError:
        raise DataError(f"{record_url} did not return JSON") from None
    files = record.get("files", [])
    files = files.get("entries", []) if isinstance(files, dict) else files  # the /files endpoint nests them
    out = {}
    for f in files:
        links = f.get("links", {})
        url = links.get("content") or links.get("self") or links.get("download")
        algorithm, _, digest = str(f.get("checksum", "")).partition(":")
        if url and algorithm == "md5":
            out[f["key"]] = {"url": url, "md5": digest, "size": f.get("size")}
    return out


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, path: Path, md5: str, size: int | None = None, timeout: float = TIMEOUT,
                  retries: int = RETRIES, progress: bool = True) -> Path:
    """Download `url` to `path` via `path.part`, resuming a previous partial download with a range request, and
    verify the md5 before the final rename. A dropped connection is retried (resuming) up to `retries` times."""
    part = path.with_name(path.name + ".part")
    for attempt in range(1, retries + 1):
        try:
            _fetch_into(url, part, size, timeout, progress)
            break
        except (URLError, OSError, http.client.HTTPException) as e:
            if isinstance(e, HTTPError):
                raise DataError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            if attempt == retries:
                raise _offline(url, getattr(e, "reason", e)) from None
            time.sleep(RETRY_WAIT * attempt)
    actual = md5_of(part)
    if actual != md5:
        part.unlink()
        raise DataError(f"{path.name}: md5 {actual} does not match Zenodo's {md5}; the corrupt download was deleted, "
                        f"run again to fetch it anew")
    os.replace(part, path)
    return path


def _fetch_into(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have >= size:
        if have == size:
            return
        part.unlink()  # longer than the file: not a partial download of it
        have = 0
    request = Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urlopen(request, timeout=timeout)
    except HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the part may hold the whole file; the md5 decides
            return
        raise
    with response:
        resumed = have > 0 and response.status == 206
        if not resumed:
            have = 0  # the server sent the whole file (it ignored or we sent no range)
        total = size if size is not None else (have + int(response.headers.get("Content-Length", 0)) or None)
        with open(part, "ab" if resumed else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5],
                     disable=not progress) as bar:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    if total is not None and got < total:
        raise ConnectionError(f"connection closed after {got} of {total} bytes")


def extract(archive: Path, dest: Path) -> int:
    """Extract a zip into `dest`, refusing members that would land outside it; return the number of files."""
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as z:
            members = [m for m in z.infolist() if not m.is_dir()]
            for m in members:
                if not (dest / m.filename).resolve().is_relative_to(dest):
                    raise DataError(f"{archive.name}: member {m.filename} would be written outside {dest}")
            z.extractall(dest, members)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive.name} is not a valid zip ({e}); delete it and run again") from None
    return len(members)


def download_ravdess(dest: str | os.PathLike, names: list[str], record_url: str = RECORD_URL,
                     keep_archives: bool = False, progress: bool = True, log=print) -> Path:
    """Fetch, verify and extract the archives `names` (see `archive_names`) into `dest`; return `dest`."""
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if not (dest / f".{n}.done").exists()]
    for name in sorted(set(names) - set(todo)):
        log(f"{name}: already downloaded and extracted")
    if not todo:
        return dest
    remote = fetch_record(record_url)
    missing = [n for n in todo if n not in remote]
    if missing:
        raise DataError(f"{missing} not in the Zenodo record {record_url} (it has {sorted(remote)})")
    for name in todo:
        info, archive = remote[name], dest / name
        if not (archive.exists() and md5_of(archive) == info["md5"]):
            download_file(info["url"], archive, info["md5"], info["size"], progress=progress)
        n = extract(archive, dest)
        (dest / f".{name}.done").write_text(info["md5"])
        if not keep_archives:
            archive.unlink()
        log(f"{name}: {n} files extracted into {dest}")
    return dest


def main() -> None:
    names = archive_names(SPEECH_AUDIO, VIDEO_ACTORS)
    if not names:
        raise DataError("nothing to download: set --speech_audio=True and/or --video_actors=[...]")
    download_ravdess(DEST, names, RECORD_URL, keep_archives=KEEP_ARCHIVES)


if __name__ == "__main__":
    from common.config import run_script

    run_script(main, globals(), sys.argv[1:], user_errors=(DataError,))
