# vlmhub's router (`vlmhub route`) as a container, next to the engine containers it starts
# through the host's Docker socket. docs/operations.md, "The router in a container".
#
# Build it with scripts/build-router-image.sh: it puts the vlmhub wheel, its dependencies and
# pip's own wheel in the build context's wheels/ folder, so this build needs no network and no
# pip in the base image:
#
#   scripts/build-router-image.sh                      # vlmhub/router:dev on python:3.11-slim
#   VLMHUB_ROUTER_BASE=some/python:3.11 scripts/build-router-image.sh
#
# The base needs Python 3.11 as `python3` (any Debian-like image: useradd). Runs as the
# unprivileged user vlmhub (uid 10001); to use the Docker socket it needs the socket's group:
# `docker run --group-add "$(stat -c %g /var/run/docker.sock)"` (compose: group_add).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG EXTRAS=""
LABEL vlmhub.router-build-stage="1"
COPY wheels/ /tmp/wheels/
# pip runs from its wheel (no pip in the base needed), offline, into a venv of its own.
RUN set -eu; \
    python3 -m venv --without-pip /opt/vlmhub; \
    pip_wheel="$(ls /tmp/wheels/pip-*.whl)"; \
    /opt/vlmhub/bin/python "${pip_wheel}/pip" install --no-cache-dir --no-index \
      --disable-pip-version-check --find-links /tmp/wheels "vlmhub${EXTRAS}"; \
    /opt/vlmhub/bin/vlmhub --help >/dev/null

FROM ${BASE}
ARG UID=10001
COPY --from=build /opt/vlmhub /opt/vlmhub
RUN set -eu; \
    useradd --uid "${UID}" --user-group --home-dir /home/vlmhub --create-home \
      --shell /usr/sbin/nologin vlmhub; \
    mkdir -p /var/lib/vlmhub /etc/vlmhub; \
    chown vlmhub:vlmhub /var/lib/vlmhub; \
    chmod 0700 /var/lib/vlmhub
# The state dir (lock, engine keys, budgets, batches): mount a volume here. A fresh named
# volume takes this directory's owner (vlmhub) and mode.
ENV PATH=/opt/vlmhub/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VLMHUB_STATE_DIR=/var/lib/vlmhub \
    HOME=/home/vlmhub
USER ${UID}:${UID}
# models.yaml goes here (mounted read-only): `vlmhub status`, `load` ... find it in the cwd.
WORKDIR /etc/vlmhub
LABEL org.opencontainers.image.title="vlmhub router"
ENTRYPOINT ["vlmhub"]
CMD ["route", "--config", "/etc/vlmhub/models.yaml"]
