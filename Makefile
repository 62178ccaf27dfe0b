# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test lint bench cached-runs pretrain

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-ray.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# Debian packages for the real-browser test (headless Chromium + its driver). Installed when
# running as root (CI); elsewhere the browser test skips with a message saying what to install.
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null; \
	else echo "note: chromium/chromium-driver not installed; the browser test will skip"; fi

run: setup
	$(BIN)/python -m streamlit run app.py

test: setup system-deps
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/live_run.py

cached-runs: setup
	$(BIN)/python -m vpeft_viz cache-runs

# Regenerate the embedded backbone's weights (CPU: about 4 hours of one core; resumable).
# Pretraining inputs: Fashion-MNIST and the photographs of the wallpaper packages (the
# recipe's photo_share; vpeft_viz/pretrain/images.py).
# The shipped weights (v2): the 30,000-step distillation schedule, stopped and written out at
# step 7,800 (vpeft_viz/weights/MODEL_CARD.md); the checkpoint lets a stopped run resume.
PRETRAIN_DIR ?= $(HOME)/.cache/vpeft_viz/pretrain_v2
PRETRAIN_DEBS = dataset-fashion-mnist plasma-workspace-wallpapers gnome-backgrounds \
	mate-backgrounds ukui-wallpapers

pretrain: setup
	$(BIN)/python -m pip install -q -r requirements-pretrain.txt
	@missing=$$(for p in $(PRETRAIN_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then echo "pretrain: install the Debian packages $$missing"; fi
	@mkdir -p $(PRETRAIN_DIR)
	if [ -f $(PRETRAIN_DIR)/v2_photos_30k.ckpt ]; then \
		$(BIN)/python -m vpeft_viz pretrain --resume $(PRETRAIN_DIR)/v2_photos_30k.ckpt \
			--checkpoint-every 150 --stop-at 7800 --log-every 50; \
	else \
		$(BIN)/python -m vpeft_viz pretrain --source distill --steps 30000 --seed 0 \
			--set batch_size=64 --set threads=1 --set fashion_share=0.25 \
			--set photo_share=0.5 --out $(PRETRAIN_DIR)/v2_photos_30k.safetensors \
			--checkpoint-every 150 --stop-at 7800 --log-every 50; \
	fi
	$(BIN)/python -m vpeft_viz pretrain --resume $(PRETRAIN_DIR)/v2_photos_30k.ckpt --snapshot \
		--out vpeft_viz/weights/vit_tiny_patch4_32_vpeft.safetensors
