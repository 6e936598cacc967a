"""Run inside a venv that holds only the package's declared dependencies (tests/install/
test_clean_install.py makes it): load -> append -> generate -> save -> load -> generate on a tiny
random checkpoint (writing it and saving the session go through safetensors, whose torch writer
needs numpy: a declared dependency for that reason)."""
import tempfile
from pathlib import Path

import anyio

import dsv4
from dsv4.loading.testing import write_random_checkpoint


async def _take(stream) -> list[int]:
    return [token async for token in stream]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "ckpt", seed=3)
        engine = dsv4.Engine(path, device="cpu")
        prompt = [5, 17, 99, 3, 42, 7, 300, 12]
        session = engine.new_session(prompt)
        first = anyio.run(_take, session.generate(max_tokens=6, temperature=0.0, ignore_eos=True))
        saved = session.save(Path(tmp) / "session")
        loaded = engine.load_session(saved)
        assert loaded.tokens == session.tokens, (loaded.tokens, session.tokens)
        a = anyio.run(_take, session.generate(max_tokens=5, temperature=0.0, ignore_eos=True))
        b = anyio.run(_take, loaded.generate(max_tokens=5, temperature=0.0, ignore_eos=True))
        assert len(first) == 6 and a == b, (first, a, b)
        print("clean-venv flow ok:", first, a)


if __name__ == "__main__":
    main()
