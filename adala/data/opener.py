"""Open shard URLs and read their samples with webdataset's tar iterators; failures are counted, not raised.

Local paths, ``file://`` and ``pipe:`` go through webdataset's ``gopen``. ``http(s)://`` is opened here with
urllib instead: webdataset hands it to ``curl`` with 30 retries 2 s apart and no read timeout, so one dead
host stalls a worker for a minute and a stalled transfer forever. Here every connect and read is bounded by
``timeout`` and a shard that cannot be opened after ``retries`` is skipped.
"""
from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Optional

from adala.data.skips import Skips

HTTP = ("http://", "https://")
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Reader:
    """How shards are fetched: ``timeout`` seconds per HTTP connect or read; ``retries`` after a failed open."""

    timeout: float = 60.0
    retries: int = 2

    def open(self, url: str) -> IO[bytes]:
        if url.startswith(HTTP):
            return self._open_http(url)
        import webdataset as wds

        return wds.gopen(url, "rb")

    def fetch(self, url: str) -> bytes:
        """A whole (small) file, e.g. a manifest."""
        with self.open(url) as stream:
            return stream.read()

    def _open_http(self, url: str) -> IO[bytes]:
        for attempt in range(self.retries):
            try:
                return urllib.request.urlopen(url, timeout=self.timeout)
            except urllib.error.HTTPError as err:
                if err.code < 500:  # not found, forbidden: asking again will not help
                    raise
            except OSError:  # refused, reset, name lookup, timeout
                pass
            time.sleep(min(2.0 ** attempt, MAX_BACKOFF_S))
        return urllib.request.urlopen(url, timeout=self.timeout)

    def samples(self, url: str, skips: Skips, select: Optional[Callable[[str], bool]] = None) -> Iterator[dict[str, Any]]:
        """The samples of one shard (dicts of ``__key__``, ``__url__`` and raw member bytes by extension).

        A shard that cannot be opened counts as ``skipped_unreachable``; one that breaks off (truncated tar,
        dropped connection, failing pipe) as ``skipped_truncated``, keeping the samples read before the break.
        """
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        try:
            stream = self.open(url)
        except Exception as err:
            skips.record("skipped_unreachable", url, err)
            return
        ended = _EndCheck(stream)
        try:
            files = ({**member, "__url__": url} for member in tar_file_iterator(ended, select_files=select))
            yield from group_by_keys(files)
            stream.close()  # a pipe reports a failed command here
            if not ended.complete:
                raise EOFError("the tar ends without its end-of-archive blocks: cut short at a member boundary")
        except Exception as err:
            skips.record("skipped_truncated", url, err)
        finally:
            with contextlib.suppress(Exception):  # after a failure or an early stop; closing twice is harmless
                stream.close()


class _EndCheck:
    """Passes reads through, remembering whether the stream ran dry and its last bytes. Python's tarfile takes
    a tar cut short exactly at a member boundary for a complete one; a complete tar either stops being read at
    its end-of-archive blocks or, read to the end, ends in zero bytes."""

    END = bytes(1024)

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream, self.tail, self.dry = stream, b"", False

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.dry = self.dry or (not data and size != 0)
        self.tail = (self.tail + data)[-len(self.END):]
        return data

    @property
    def complete(self) -> bool:
        return not self.dry or self.tail == self.END
