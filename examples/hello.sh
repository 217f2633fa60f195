#!/bin/bash
# A first job: says where it runs, and with what.
echo "Hello from $(hostname), job $SSHQ_JOB_NAME (sshq id $SSHQ_ID)"
echo "working in $PWD"
sleep 1
echo "done"
