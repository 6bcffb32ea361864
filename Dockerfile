# The bridge's image: no base image, only the static binary (scripts/image builds it and
# this file's context, target/image), the CA certificates, and a non-root user.
#   scripts/image                     builds both, with buildah or docker
#   docker run -e MQTT_BROKER=… -e KAFKA_BROKERS=… -p 8080:8080 mqtt-kafka-bridge:<version>
FROM scratch
COPY mqtt-kafka-bridge /usr/local/bin/mqtt-kafka-bridge
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY passwd group /etc/
# An empty directory owned by the bridge's user, so a fresh volume mounted there is writable.
COPY --chown=10001:10001 spool/ /var/lib/mqtt-kafka-bridge/
USER 10001:10001
# SSL_CERT_FILE: OpenSSL (MQTT TLS) and librdkafka (Kafka TLS) find the CA bundle there.
ENV SPOOL_DIR=/var/lib/mqtt-kafka-bridge \
    HEALTH_PORT=8080 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
VOLUME ["/var/lib/mqtt-kafka-bridge"]
EXPOSE 8080
# A scratch image has no curl: the binary asks its own /healthz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/mqtt-kafka-bridge", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/mqtt-kafka-bridge"]
