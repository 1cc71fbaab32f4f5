# The image a Ray cluster runs: the official Ray image for our Ray and Python, plus m3-curate
# installed with exactly the versions of constraints.txt (the stack the tests ran on).
# GPU nodes: build with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
# Linted in CI by hadolint (.ci/run); no image is built there.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# The Ray images' own unprivileged user, ray (uid 1000, group users = 100), by number so that
# nothing below and nothing the cluster runs is root, whatever the base image's last USER was.
USER 1000:100
WORKDIR /home/ray/m3-curate
COPY --chown=1000:100 constraints.txt pyproject.toml README.md ./
COPY --chown=1000:100 curation ./curation
COPY --chown=1000:100 expert_runners ./expert_runners
COPY --chown=1000:100 prompts ./prompts
COPY --chown=1000:100 manifests ./manifests
RUN pip install --no-cache-dir --constraint constraints.txt .
