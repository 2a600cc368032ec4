#!/usr/bin/env bash
# One-time IAM setup for cluster/ray-cluster.aws.yaml. Creates (or updates) two EC2
# instance profiles:
#
#   metakd-ray-head    launches and terminates the worker instances (EC2), reads the AMI's
#                      public SSM parameter, reads/writes the results bucket, and may pass
#                      the worker role to the instances it launches (iam:PassRole).
#   metakd-ray-worker  reads/writes the results bucket only (Train workers write teacher
#                      checkpoints and results there).
#
# Usage (needs IAM admin rights; run again after changing the bucket):
#   bash cluster/aws_iam.sh my-bucket
set -euo pipefail

bucket="${1:?usage: bash cluster/aws_iam.sh BUCKET   (the bucket of --storage s3://BUCKET/prefix)}"
account=$(aws sts get-caller-identity --query Account --output text)

trust='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
  "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'

s3_policy='{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
   "Resource": "arn:aws:s3:::'"$bucket"'"},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
   "s3:AbortMultipartUpload"], "Resource": "arn:aws:s3:::'"$bucket"'/*"}]}'

head_policy='{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": "iam:PassRole",
   "Resource": "arn:aws:iam::'"$account"':role/metakd-ray-worker"},
  {"Effect": "Allow", "Action": "ssm:GetParameters",
   "Resource": "arn:aws:ssm:*::parameter/aws/service/deeplearning/*"}]}'

# make_profile NAME: a role NAME that EC2 may assume, with S3 access to the bucket, inside an
# instance profile of the same name.
make_profile() {
  local name=$1
  if ! aws iam get-role --role-name "$name" > /dev/null 2>&1; then
    aws iam create-role --role-name "$name" --assume-role-policy-document "$trust" > /dev/null
  fi
  aws iam put-role-policy --role-name "$name" --policy-name metakd-results-bucket \
    --policy-document "$s3_policy"
  if ! aws iam get-instance-profile --instance-profile-name "$name" > /dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$name" > /dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$name" --role-name "$name"
  fi
}

make_profile metakd-ray-worker
make_profile metakd-ray-head
aws iam attach-role-policy --role-name metakd-ray-head \
  --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess
aws iam put-role-policy --role-name metakd-ray-head --policy-name metakd-launch-workers \
  --policy-document "$head_policy"

echo "instance profiles metakd-ray-head and metakd-ray-worker are ready for s3://$bucket"
