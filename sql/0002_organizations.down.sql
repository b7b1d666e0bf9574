DROP TABLE api_keys;
DROP TABLE organization_plans;
DROP TABLE organizations;
