"""Run a stage script and SIGKILL it half-way through writing one of its files: a power cut or the OOM killer at
the worst moment, made repeatable.

    python tests/kill_during_write.py WRITER N stages/<stage>.py

WRITER is the writer to interrupt, N which of its calls: `torch.save` (checkpoints, weights), `shard` (a stored
split's label and image files, storage.write_array), `fill` (a folder's shard, filled image by image by
decoding.fill_shards in this process, as for a small folder: call N fills half its images, then dies) or `fetch`
(the verified copy of a data-set file). The first N-1 calls run normally; call N writes half of its bytes to the
path it was given, flushes them to disk, and the process kills itself with SIGKILL, so nothing can clean up. If the
stage finishes first, this exits with status 3.
"""

import io
import os
import runpy
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def write_half_and_die(target, data: bytes) -> None:
    """Write half of `data` to a path or an open file, make it durable, and die."""
    if hasattr(target, "write"):
        target.write(data[: len(data) // 2])
        target.flush()
    else:
        with open(target, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
    die()


def main() -> None:
    writer, target, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    calls = 0

    def is_target() -> bool:
        nonlocal calls
        calls += 1
        return calls == target

    if writer == "torch.save":
        import torch

        save = torch.save

        def killing_save(obj, f, *args, **kwargs):
            if not is_target():
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            write_half_and_die(f, buffer.getvalue())

        torch.save = killing_save
    elif writer == "shard":
        from image_classifier import storage

        write_array = storage.write_array

        def killing_write_array(path, array):
            if not is_target():
                return write_array(path, array)
            import numpy

            buffer = io.BytesIO()
            numpy.lib.format.write_array(buffer, numpy.ascontiguousarray(array), allow_pickle=False)
            write_half_and_die(path, buffer.getvalue())

        storage.write_array = killing_write_array
    elif writer == "fill":
        from image_classifier import decoding

        fill = decoding._fill

        def killing_fill(shard, offset, first, files, *args):
            if not is_target():
                return fill(shard, offset, first, files, *args)
            fill(shard, offset, first, files[: len(files) // 2], *args)
            die()

        decoding._fill = killing_fill
    elif writer == "fetch":
        from image_classifier import fetch

        copy = fetch._copy_verified

        def killing_copy(stream, out, remote, *args):
            if not is_target():
                return copy(stream, out, remote, *args)

            class HalfThenDie:
                written = 0

                def write(self, data: bytes) -> None:
                    out.write(data)
                    self.written += len(data)
                    if self.written >= remote.size // 2:
                        out.flush()
                        os.fsync(out.fileno())
                        die()

            return copy(stream, HalfThenDie(), remote, *args)

        fetch._copy_verified = killing_copy
    else:
        sys.exit(f"unknown writer {writer!r}")

    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        print(f"the stage exited ({exit.code}) before write {target} of {writer}", file=sys.stderr)
    else:
        print(f"the stage finished before write {target} of {writer}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    main()
