#!/usr/bin/env bash
# One-time IAM setup for cluster/ray-cluster.aws.yaml. Creates (or updates) two EC2
# instance profiles:
#
#   metakd-ray-head    what Ray's autoscaler calls on the head, and no more: launches worker
#                      instances tagged ray-cluster-name=metakd, and starts, stops, tags and
#                      terminates only instances carrying that tag (EC2); the read-only
#                      Describe calls it needs; reads the AMI's public SSM parameter; passes
#                      only the worker role to the instances it launches (iam:PassRole); and
#                      reads/writes the one results bucket. No AmazonEC2FullAccess: whoever
#                      gets code onto the head (see the README on the bucket and Tune's
#                      restore) gets these rights, so they are kept to this cluster's instances.
#   metakd-ray-worker  reads/writes the results bucket only (Train workers write teacher
#                      checkpoints and results there).
#
# Usage (needs IAM admin rights; run again after changing the bucket or the region):
#   bash cluster/aws_iam.sh my-bucket [us-west-2]
set -euo pipefail

bucket="${1:?usage: bash cluster/aws_iam.sh BUCKET [REGION]   (the bucket of --storage s3://BUCKET/prefix)}"
region="${2:-us-west-2}"  # provider.region of cluster/ray-cluster.aws.yaml
cluster=metakd            # cluster_name of cluster/ray-cluster.aws.yaml: Ray tags its instances with it
account=$(aws sts get-caller-identity --query Account --output text)

trust='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
  "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'

s3_policy='{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
   "Resource": "arn:aws:s3:::'"$bucket"'"},
  {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
   "s3:AbortMultipartUpload"], "Resource": "arn:aws:s3:::'"$bucket"'/*"}]}'

ec2="arn:aws:ec2:$region:$account"
head_policy='{"Version": "2012-10-17", "Statement": [
  {"Sid": "Describe", "Effect": "Allow", "Resource": "*",
   "Action": ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages",
              "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs",
              "ec2:DescribeAvailabilityZones"]},
  {"Sid": "LaunchTaggedWorkers", "Effect": "Allow", "Action": "ec2:RunInstances",
   "Resource": "'"$ec2"':instance/*",
   "Condition": {"StringEquals": {"aws:RequestTag/ray-cluster-name": "'"$cluster"'"}}},
  {"Sid": "LaunchWith", "Effect": "Allow", "Action": "ec2:RunInstances",
   "Resource": ["arn:aws:ec2:'"$region"'::image/*", "'"$ec2"':subnet/*", "'"$ec2"':network-interface/*",
                "'"$ec2"':volume/*", "'"$ec2"':security-group/*", "'"$ec2"':key-pair/*"]},
  {"Sid": "TagOnLaunch", "Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "'"$ec2"':*/*",
   "Condition": {"StringEquals": {"ec2:CreateAction": "RunInstances"}}},
  {"Sid": "ManageOwnWorkers", "Effect": "Allow", "Resource": "'"$ec2"':instance/*",
   "Action": ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StartInstances", "ec2:StopInstances"],
   "Condition": {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": "'"$cluster"'"}}},
  {"Sid": "PassWorkerRole", "Effect": "Allow", "Action": "iam:PassRole",
   "Resource": "arn:aws:iam::'"$account"':role/metakd-ray-worker",
   "Condition": {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}},
  {"Sid": "ResolveAmi", "Effect": "Allow", "Action": "ssm:GetParameters",
   "Resource": "arn:aws:ssm:'"$region"'::parameter/aws/service/deeplearning/*"}]}'

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
# an earlier version of this script attached AmazonEC2FullAccess: take it away
aws iam detach-role-policy --role-name metakd-ray-head \
  --policy-arn arn:aws:iam::aws:policy/AmazonEC2FullAccess > /dev/null 2>&1 || true
aws iam put-role-policy --role-name metakd-ray-head --policy-name metakd-launch-workers \
  --policy-document "$head_policy"

echo "instance profiles metakd-ray-head and metakd-ray-worker are ready for s3://$bucket"
