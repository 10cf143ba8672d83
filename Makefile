# make setup: Fashion-MNIST (Debian package as root, else torchvision's download) and every Python dependency, into
# the active Python environment (activate a venv first if you want one); make test: the CPU test suite.
PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)

.PHONY: setup data deps test test-slow bench default-run train clean slurm-start slurm-stop method-table distill \
	distill-table field-table classifier-table editor-table

setup: data deps
	@$(PYTHON) -m diffguide.data.fashion_mnist >/dev/null 2>&1 || $(PYTHON) -m diffguide.data.fashion_mnist --download
	$(PYTHON) -m diffguide.data.fashion_mnist

data:
	@if [ -n "$$DIFFGUIDE_FMNIST_DIR" ] || [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist); \
	else \
		echo "not root: Fashion-MNIST will come from torchvision's download"; \
	fi

deps:
	# torch and torchvision pinned to the releases this project is tested with (on this machine: from local disk).
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e '.[test]'

test:
	$(PYTHON) -m pytest -q -rs

# a single-node Slurm cluster on this machine (root), for tests/test_slurm.py and for trying hydra/launcher=slurm
slurm-start:
	scripts/slurm_local.sh install
	scripts/slurm_local.sh start

slurm-stop:
	scripts/slurm_local.sh stop

# every guidance method at a scale tuned by one rule (a bracketing search at 1000 samples), then 2000 samples per
# point with intervals and paired differences to cfg (README table); resumable: a rerun extends what is on disk
method-table:
	$(PYTHON) scripts/method_table.py
	$(PYTHON) -m diffguide.report outputs/method_table

# guidance distillation (README "Distilled students"): stage 1, progressive rounds 16 -> 8 -> 4 steps, the LoRA
# student, then the table against CFG and the FID-vs-NFE plot (about 90 min on a 2-core CPU)
distill:
	$(PYTHON) -m diffguide.train train=fmnist_guided_student train.out=shipped train.overwrite=true
	$(PYTHON) -m diffguide.train train=fmnist_progressive train.out=shipped train.overwrite=true
	$(PYTHON) -m diffguide.train train=fmnist_guided_student_lora train.out=shipped train.overwrite=true
	$(MAKE) distill-table

distill-table:
	$(PYTHON) scripts/distill_table.py
	$(PYTHON) scripts/bench_distill.py

# the field's methods (README "The field's methods on both models"): 500 samples per point on the embedded UNet, then
# on the embedded transformer (about 30 min and 45 min on a 2-core CPU); resumable
field-table:
	$(PYTHON) scripts/method_table.py --grid field --out outputs/method_table_field --tune-samples 500 --num-samples 500
	$(PYTHON) scripts/method_table.py --grid field_dit --out outputs/method_table_dit --tune-samples 500 \
		--num-samples 500 model=fmnist_dit

# the classifiers compared in classifier guidance (noise-aware, PPAP experts, EluCD), each row's scale tuned by the rule
classifier-table:
	$(PYTHON) scripts/method_table.py --grid classifiers --out outputs/method_table_classifiers --tune-samples 500 \
		--num-samples 500 --extend 1

# the Diffusion Classifier's accuracy, and reconstruction / class edits after DDIM, CFG++ and null-text inversion
editor-table:
	PYTHON=$(PYTHON) bash scripts/editor_table.sh outputs/editor_table

test-slow:
	$(PYTHON) -m pytest -q -m slow

bench:
	$(PYTHON) scripts/bench_sampling.py --batch 125 --repeats 2
	$(PYTHON) scripts/bench_dit.py --arch S --batch 8 --steps 10 --repeats 3

default-run:
	$(PYTHON) -m diffguide.run

train:
	$(PYTHON) -m diffguide.train train=fmnist_evaluator train.out=shipped train.overwrite=true
	$(PYTHON) -m diffguide.train train=fmnist_unet train.out=shipped train.overwrite=true

clean:
	rm -rf outputs multirun .pytest_cache
