# The image a Ray cluster runs: the official Ray image for our Ray and Python, plus m3-curate.
# GPU nodes: build with --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

WORKDIR /opt/m3-curate
COPY pyproject.toml README.md ./
COPY curation ./curation
COPY expert_runners ./expert_runners
COPY prompts ./prompts
COPY manifests ./manifests
RUN pip install --no-cache-dir .
