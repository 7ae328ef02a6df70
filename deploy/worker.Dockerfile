# The triage image, for `triage serve` and GPU workers alike. torch is installed for CUDA here;
# on a CPU-only host `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/triage
COPY . .
RUN pip install --no-cache-dir "torch==2.13.0" && pip install --no-cache-dir .
USER nobody
EXPOSE 11112 8080
