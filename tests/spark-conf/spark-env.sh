# Sourced by Spark's launch scripts for every process of the test run (SPARK_CONF_DIR, tests/conftest.py). The
# standalone cluster's master and workers (scripts/local-cluster.sh) take their JVM options from here, not from
# spark-defaults.conf: the same client compiler and serial collector as the tests' other JVMs (their CPU in
# tests/test_cluster.py: 14 -> 7 CPU-seconds).
SPARK_DAEMON_JAVA_OPTS="${SPARK_DAEMON_JAVA_OPTS:-} -XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
